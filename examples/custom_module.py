"""A TemporalMemory layer inside your own nn.Module: the layer learns its input sequence by
its local rule, and a linear readout on its cells learns, by gradient, to tell which of two
sequences a stream is in (something only the layer's context shows: both share a middle).

    python examples/custom_module.py

The layer's state is passed in and out, as with any recurrent module; the local rule is a
callable given to each step (`learn=`). Pure torch: no Lightning, no Hydra.
"""

import torch
from torch import nn

from predictive import PredictiveHebbian, TemporalMemory


class SequenceClassifier(nn.Module):
    def __init__(self, input_size: int, classes: int):
        super().__init__()
        self.memory = TemporalMemory(input_size, columns=128, cells=4, active_columns=8)
        self.rule = PredictiveHebbian(new_synapses=8)
        self.rule.check(self.memory)  # new_synapses fits the layer's synapses
        self.readout = nn.Linear(self.memory.output_size, classes)

    def forward(self, x: torch.Tensor, learn: bool = True) -> torch.Tensor:
        """x: (B, T, D) -> class scores (B, T, classes) at every step."""
        state = self.memory.initial_state(x.shape[0])
        scores = []
        for t in range(x.shape[1]):
            with torch.no_grad():  # the layer learns locally; no gradient reaches it
                step, state = self.memory(x[:, t], state, learn=self.rule if learn else None)
            scores.append(self.readout(step.cells))
        return torch.stack(scores, 1)


torch.manual_seed(0)
width = 128
codes = torch.zeros(6, width)
for i in range(6):
    codes[i, torch.randperm(width)[:8]] = 1.0
sequences = torch.stack([codes[[0, 1, 2, 3]], codes[[4, 1, 2, 5]]])  # A B C D and X B C Y
labels = torch.tensor([0, 1])

model = SequenceClassifier(width, classes=2)
optimizer = torch.optim.Adam(model.readout.parameters(), lr=0.05)
for _ in range(30):
    scores = model(sequences)
    # Classify at the third element (C): the input alone is the same in both sequences.
    loss = nn.functional.cross_entropy(scores[:, 2], labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
with torch.no_grad():
    guess = model(sequences, learn=False)[:, 2].argmax(-1)
print(f"loss {loss.item():.3f}; at C the readout says sequence {guess.tolist()} (truth {labels.tolist()})")
