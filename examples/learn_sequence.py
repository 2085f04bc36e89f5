"""Learn two high-order sequences online, one record at a time, and print what the layer
predicts next and how surprised it was (its anomaly score) at every step.

    python examples/learn_sequence.py

A B C D and X B C Y share their middle: which ending comes depends on the first element, three
steps back. A temporal memory keeps B and C in different cells in the two contexts, so after a
few passes it predicts D after A B C and Y after X B C. Pure torch: no Lightning, no Hydra.
"""

import torch

from predictive import Local, PredictiveStack

torch.manual_seed(0)
symbols = "ABCDXY"
width, active = 128, 8
codes = torch.zeros(len(symbols), width)  # a fixed sparse code per symbol: 8 of 128 bits
for i in range(len(symbols)):
    codes[i, torch.randperm(width)[:active]] = 1.0


def closest(prediction: torch.Tensor) -> str:
    """The symbol whose code overlaps the decoded prediction most ('-' for no prediction)."""
    overlap = codes @ prediction
    return symbols[int(overlap.argmax())] if overlap.max() > active / 2 else "-"


stack = PredictiveStack(width, columns=128, cells=4, active_columns=8, learning=Local(new_synapses=8))
for sweep in range(12):
    for sequence in ("ABCD", "XBCY"):
        shown = sweep in (0, 11)
        for symbol in sequence:
            out = stack.step(codes[symbols.index(symbol)])  # predict, compare, learn
            if shown:
                print(f"pass {sweep:2d}  saw {symbol}  anomaly {float(out.anomaly):.2f}  "
                      f"predicts next: {closest(out.prediction)}")
        stack.reset()  # a new sequence: no context carried over
        if shown:
            print()
