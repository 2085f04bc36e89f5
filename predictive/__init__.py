"""predictive: sparse temporal-memory layers that predict their next input and learn locally.

    from predictive import TemporalMemory, PredictiveStack, Local, Backprop, Hybrid

The core (this package) needs torch alone; numba loads the first time a layer runs its
compiled local step on a CPU. The Lightning harness lives in `predictive.harness`.
"""

from predictive.baselines import ConvNet, LSTMModel
from predictive.dendrites import DendriticSegments, DistalSegments
from predictive.learning import Backprop, Frozen, Hybrid, LearningRule, Local, PredictiveHebbian
from predictive.learning import build as build_rule
from predictive.memory import LayerState, LayerStep, TemporalMemory
from predictive.proximal import contrastive_predictive_loss
from predictive.sparse import KWinners, SparseLinear, kwinners
from predictive.stack import PredictiveStack, StackOutput, StepOutput

__version__ = "0.1.0"

__all__ = [
    "Backprop", "ConvNet", "DendriticSegments", "DistalSegments", "Frozen", "Hybrid", "KWinners", "LSTMModel",
    "LayerState", "LayerStep", "LearningRule", "Local", "PredictiveHebbian", "PredictiveStack", "SparseLinear",
    "StackOutput", "StepOutput", "TemporalMemory", "build_rule", "contrastive_predictive_loss", "kwinners",
]
