"""Dense baselines with the same surface as `PredictiveStack` (see docs/interfaces.md)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from predictive.learning import LearningRule
from predictive.sparse import KWinners, SparseLinear, check_positive, mask_weights
from predictive.stack import SequenceModel, StackOutput

State = dict[str, torch.Tensor]


def dense_output(x: torch.Tensor, hidden: torch.Tensor, decoder: nn.Module, rule: LearningRule) -> StackOutput:
    """A dense model's output: its (B, T, N) hidden features stand for cells and predicted
    cells, `decoder` predicts the next input from them, and the error of that prediction is
    the local loss (hybrid's, and an LSTM's in local mode). No anomaly score."""
    prediction = decoder(hidden)
    local_loss = x.new_zeros(())
    if rule.local_loss_weight > 0 and x.shape[1] > 1:
        local_loss = F.mse_loss(prediction[:, :-1], x[:, 1:].detach())
    anomaly = x.new_zeros(x.shape[:2])
    return StackOutput(cells=hidden, predicted=hidden, prediction=prediction, anomaly=anomaly, local_loss=local_loss)


class LSTMModel(SequenceModel):
    """torch's LSTM, plus a linear decoder of the next input from the hidden state.

    backprop/hybrid: trained by the task loss through time over the chunk (truncated BPTT);
    hybrid adds the next-input prediction loss. local: the LSTM learns only to predict its
    next input, with its state cut every step (one step of gradient, no task gradient).
    """

    def __init__(self, input_size: int, hidden_size: int = 256, num_layers: int = 1):
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

    def run(self, x: torch.Tensor, state: State, reset: torch.Tensor | None, rule: LearningRule):
        local = rule.is_local(0)
        h, c = state["h"], state["c"]
        if reset is not None and not local and not reset[:, 1:].any():  # resets at the first step only (a clip starts)
            keep = (~reset[:, 0]).to(x.dtype).view(1, -1, 1)
            h, c, reset = h * keep, c * keep, None
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
        return dense_output(x, hidden, self.decoder, rule), {"h": h, "c": c}

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, num_layers={self.num_layers}"


def fraction(v, closed: str) -> bool:
    """v is a number in (0, 1] (closed="high") or [0, 1) (closed="low")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return 0 < v <= 1 if closed == "high" else 0 <= v < 1


def per_layer(value, layers: int, name: str, closed: str, null: bool = False) -> list:
    """One setting for every layer, or a list of `layers` settings: fractions in (0, 1]
    (closed="high") or [0, 1) (closed="low"), or null where `null`."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * layers
    if len(values) != layers:
        raise ValueError(f"model.{name} must be one value or {layers} (one per layer), got {value!r}")
    if not all((null and v is None) or fraction(v, closed) for v in values):
        span = "(0, 1]" if closed == "high" else "[0, 1)"
        raise ValueError(f"model.{name} must be in {span}{' or null' if null else ''}, got {value!r}")
    return values


class MapWinners(KWinners):
    """k-WTA over all maps and frequency bins of each time step: x (B, maps, T, bins) keeps
    k of maps x bins at every t (the per-step form of nupic.torch's KWinners2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.transpose(1, 2).flatten(2)  # (B, T, maps x bins)
        return super().forward(steps).unflatten(2, (x.shape[1], x.shape[3])).transpose(1, 2)


class ConvNet(SequenceModel):
    """A small CNN: the keyword-spotting CNNs of Ahmad & Scheinkman (2019) (after Sainath &
    Parada 2015), `layers` x (5x5 convolution of `channels` maps over (time, frequency), batch
    norm, ReLU, max-pool 2 over frequency), plus a linear decoder of the next input.

    Dense by default. Their sparse CNN: `activity` (the fraction of a layer's units that stay
    active at each step, k-WTA with boosting in place of the ReLU, after the pooling),
    `weight_sparsity` (the fraction of zero weights of each map, a fixed random mask), and a
    sparse hidden layer of `hidden` units (`hidden_weight_sparsity`, `hidden_activity`) between
    the convolutions and the head. Each accepts one value for every layer or a list.

    Each step's `input_size` values are read as maps of `frequency_bins` values side by side
    (speech: log-mel, deltas and the spliced frames, e.g. 9 x 2 maps of 40 mel bins). The
    convolutions are causal in time: the output at t sees the inputs t - R .. t (R =
    layers x (kernel_size - 1)), as the stack and the LSTM see only the past, and the state
    carries the last R inputs across chunks. Time keeps its resolution, so the head pools over
    it as it does for the other models. It learns by gradient only: backprop, or hybrid with
    the next-input loss.
    """

    def __init__(
        self, input_size: int, channels: int = 64, kernel_size: int = 5, layers: int = 2,
        frequency_bins: int | None = None,
        # the sparse CNN's settings
        activity: float | list[float] | None = None, weight_sparsity: float | list[float] = 0.0,
        hidden: int = 0, hidden_activity: float = 0.1, hidden_weight_sparsity: float = 0.9,
        boost_strength: float = 1.5, boost_strength_factor: float = 1.0, duty_cycle_period: int = 1000,
        k_inference_factor: float = 1.0,
    ):
        super().__init__()
        check_positive(input_size=input_size, channels=channels, kernel_size=kernel_size, layers=layers)
        bins = frequency_bins or input_size
        if input_size % bins or bins >> layers < 1:
            raise ValueError(
                f"model.frequency_bins={frequency_bins} must divide the input size {input_size} and leave at "
                f"least one bin after {layers} poolings by 2"
            )
        activity = per_layer(activity, layers, "activity", "high", null=True)
        weight_sparsity = per_layer(weight_sparsity, layers, "weight_sparsity", "low")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"model.hidden must be an integer >= 0, got {hidden!r}")
        if hidden:
            per_layer(hidden_activity, 1, "hidden_activity", "high")
            per_layer(hidden_weight_sparsity, 1, "hidden_weight_sparsity", "low")
        self.input_size, self.channels, self.kernel_size, self.layers = input_size, channels, kernel_size, layers
        self.bins, self.history, self.hidden = bins, layers * (kernel_size - 1), hidden
        self.sparse = any(a is not None for a in activity) or any(weight_sparsity) or hidden > 0
        boosting = dict(boost_strength=boost_strength, boost_strength_factor=boost_strength_factor,
                        duty_cycle_period=duty_cycle_period, k_inference_factor=k_inference_factor)
        convs, maps = [], input_size // bins
        for i in range(layers):
            conv = nn.Conv2d(maps, channels, kernel_size, padding=(0, kernel_size // 2))
            if weight_sparsity[i]:
                mask_weights(conv, weight_sparsity[i])
            if activity[i] is None:
                convs += [conv, nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d((1, 2))]
            else:  # the sparse CNN's order: pool, then k-WTA
                units = channels * (bins >> (i + 1))
                winners = MapWinners(units, activity[i], **boosting)
                convs += [conv, nn.BatchNorm2d(channels), nn.MaxPool2d((1, 2)), winners]
            maps = channels
        self.convs = nn.Sequential(*convs)
        if hidden:
            self.dense = SparseLinear(channels * (bins >> layers), hidden, hidden_weight_sparsity)
            self.dense_norm = nn.BatchNorm1d(hidden)
            self.dense_winners = KWinners(hidden, hidden_activity, **boosting)
        self.decoder = nn.Linear(self.output_size, input_size)

    @property
    def output_size(self) -> int:
        return self.hidden or self.channels * (self.bins >> self.layers)

    def check_rule(self, rule: LearningRule) -> None:
        """Called by `LearningRule.check` before training: the CNN learns by gradient only."""
        if rule.is_local(0) and rule.trains_model:
            raise ValueError("model=cnn has no local learning rule: use learning=backprop, hybrid or frozen")

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return {"history": torch.zeros(batch_size, self.history, self.input_size, device=device)}

    def run(self, x: torch.Tensor, state: State, reset: torch.Tensor | None, rule: LearningRule):
        """reset: only at t = 0 (a clip or stream starts)."""
        self.check_rule(rule)
        history = state["history"]
        if reset is not None:
            if reset[:, 1:].any():
                raise ValueError("model=cnn: a reset after the first step of a chunk is not supported")
            history = history * (~reset[:, :1]).to(x.dtype).unsqueeze(-1)
        b, t, _ = x.shape
        frames = torch.cat([history, x], 1)  # (B, R + T, D)
        maps = frames.view(b, self.history + t, -1, self.bins).transpose(1, 2)  # (B, maps, R + T, bins)
        hidden = self.convs(maps).permute(0, 2, 1, 3).flatten(2)  # (B, T, channels x bins / 2^layers)
        if self.hidden:
            hidden = self.dense_norm(self.dense(hidden).transpose(1, 2)).transpose(1, 2)  # (B, T, hidden)
            hidden = self.dense_winners(hidden)
        return dense_output(x, hidden, self.decoder, rule), {"history": frames[:, t:]}

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, channels={self.channels}, kernel_size={self.kernel_size}, "
            f"layers={self.layers}, frequency_bins={self.bins}, hidden={self.hidden}, sparse={self.sparse}"
        )
