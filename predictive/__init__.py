"""predictive: sparse temporal-memory layers that predict their next input and learn locally."""

__version__ = "0.1.0"
