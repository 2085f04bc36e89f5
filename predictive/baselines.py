"""Dense baselines with the same surface as `PredictiveStack` (see docs/interfaces.md)."""

import torch
import torch.nn.functional as F
from torch import nn

from predictive.learning import Backprop, LearningRule
from predictive.sparse import check_positive
from predictive.stack import StackOutput, check_input, detach_state

State = dict[str, torch.Tensor]


class LSTMModel(nn.Module):
    """torch's LSTM, plus a linear decoder of the next input from the hidden state.

    backprop/hybrid: trained by the task loss through time over the chunk (truncated BPTT);
    hybrid adds the next-input prediction loss. local: the LSTM learns only to predict its
    next input, with its state cut every step (one step of gradient, no task gradient).
    """

    def __init__(self, input_size: int, hidden_size: int = 128, num_layers: int = 1):
        super().__init__()
        check_positive(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.decoder = nn.Linear(hidden_size, input_size)

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        shape = (self.num_layers, batch_size, self.hidden_size)
        return {"h": torch.zeros(shape, device=device), "c": torch.zeros(shape, device=device)}

    detach_state = staticmethod(detach_state)

    def forward(
        self,
        x: torch.Tensor,
        state: State,
        reset: torch.Tensor | None = None,
        learning: LearningRule | None = None,
    ) -> tuple[StackOutput, State]:
        """x: (B, T, D); reset: (B, T) bool or None."""
        check_input(x, self.input_size)
        rule = learning or Backprop()
        local = rule.is_local(0)
        h, c = state["h"], state["c"]
        if reset is None and not local:
            hidden, (h, c) = self.lstm(x, (h, c))  # one fused call when nothing cuts the chunk
        else:
            outputs = []
            for t in range(x.shape[1]):
                if local:
                    h, c = h.detach(), c.detach()
                if reset is not None:
                    keep = (~reset[:, t]).to(x.dtype).view(1, -1, 1)
                    h, c = h * keep, c * keep
                out, (h, c) = self.lstm(x[:, t : t + 1], (h, c))
                outputs.append(out)
            hidden = torch.cat(outputs, 1)
        prediction = self.decoder(hidden)
        local_loss = x.new_zeros(())
        if rule.local_loss_weight > 0 and x.shape[1] > 1:
            local_loss = F.mse_loss(prediction[:, :-1], x[:, 1:].detach())
        out = StackOutput(
            cells=hidden,
            predicted=hidden,
            prediction=prediction,
            anomaly=x.new_zeros(x.shape[:2]),
            local_loss=local_loss,
        )
        return out, {"h": h, "c": c}

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, num_layers={self.num_layers}"
