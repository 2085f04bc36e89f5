"""The training harness: the one LightningModule, its callbacks and the multirun report.

It imports the core (`predictive`), never the other way: `import predictive` pulls in no
Lightning, Hydra, wandb, pandas or matplotlib.
"""
