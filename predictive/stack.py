"""A stack of temporal-memory layers: each layer's cells are the next layer's input, and each
layer predicts its own next input."""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from predictive.learning import Backprop, LearningRule, Local
from predictive.memory import LayerState, TemporalMemory, column_activity

State = dict[str, torch.Tensor]


def detach_state(state: State) -> State:
    """Cut the graph between chunks (truncated BPTT), keeping the values."""
    return {name: value.detach() for name, value in state.items()}


def fused_supported(layer: TemporalMemory, hebbian, x: torch.Tensor) -> bool:
    """Can `predictive.fused.run_layer` stand in for the torch steps? CPU, float32, and none
    of the settings it does not implement (first-order fallback, feedforward learning)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and layer.segments.permanence.dtype == torch.float32
        and not layer.first_order_fallback
        and (hebbian is None or hebbian.feedforward_rate == 0)
    )


def compiled_rule(rule: LearningRule, model: nn.Module):
    """What the compiled steps run of `rule` for `model`: its local rule in every layer (a rule
    that `updates_layers`), nothing (inference: a rule that changes no layer, when no gradient
    of the layers' outputs is wanted), or False: the torch steps run."""
    if not rule.fused:
        return False
    if rule.updates_layers:
        return rule.hebbian
    wants_gradient = torch.is_grad_enabled() and rule.task_loss_trains_model and any(
        p.requires_grad for p in model.parameters())
    return False if wants_gradient else None


class StepOutput(NamedTuple):
    """What `PredictiveStack.step` returns for one input (one stream: no batch dimension)."""

    prediction: torch.Tensor  # (B, D) the bottom layer's decoded prediction of the next input
    columns: torch.Tensor  # (B, C) bool, the top layer's active columns
    cells: torch.Tensor  # (B, N) the top layer's cell activity (0/1)
    anomaly: torch.Tensor  # (B,) share of the bottom layer's active columns that were not predicted


@dataclass
class StackOutput:
    """Outputs of a chunk of T steps for B streams."""

    cells: torch.Tensor  # (B, T, N) top layer's cell activity at t
    predicted: torch.Tensor  # (B, T, N) top layer's cells predicted for t+1
    prediction: torch.Tensor  # (B, T, D) bottom layer's decoded prediction of x[t+1]
    anomaly: torch.Tensor  # (B, T) bottom layer's anomaly score
    local_loss: torch.Tensor  # scalar, mean over steps of the non-local layers' local losses


class SequenceModel(nn.Module):
    """The surface the harness drives (docs/interfaces.md): `initial_state(B)`, `forward(x,
    state, reset, learning) -> (StackOutput, state)`, `detach_state`, `output_size`. A model
    implements `run`, which gets a checked input and a rule (`Backprop()` when none is given:
    no local updates)."""

    input_size: int
    detach_state = staticmethod(detach_state)

    def forward(
        self, x: torch.Tensor, state: State, reset: torch.Tensor | None = None, learning: LearningRule | None = None
    ) -> tuple[StackOutput, State]:
        """x: (B, T, D); reset: (B, T) bool (clear that stream's state before step t) or None."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"input has shape {tuple(x.shape)}, expected (batch, time, input_size={self.input_size})")
        return self.run(x, state, reset, learning or Backprop())

    def run(self, x: torch.Tensor, state: State, reset: torch.Tensor | None, rule: LearningRule):
        raise NotImplementedError


class PredictiveStack(SequenceModel):
    """L temporal-memory layers.

    Online, one record at a time (the state of one set of streams is kept in the module):

        stack = PredictiveStack(64, columns=256, cells=8)      # learns by Local() rules
        for x in records:                                       # x: (64,) or (B, 64)
            out = stack.step(x)                                 # predict, then learn
            out.prediction, out.anomaly
        stack.reset()                                           # a new sequence

    Chunks of B streams x T steps, with the state passed in and out (what training harnesses
    use): `forward(x, state, reset, learning=rule)`.

    Args:
        input_size: width of the encoded input.
        layers: the number of layers, or one dict of settings per layer (overriding `defaults`).
        learning: the rule `step` learns by, checked against the layers here (None: `Local()`
            with its defaults, checked at the first step).
        **defaults: `TemporalMemory` settings shared by all layers.
    """

    def __init__(
        self, input_size: int, layers: int | list[dict] = 1, learning: LearningRule | None = None, **defaults
    ):
        super().__init__()
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"layers must be >= 1, got {layers}")
            layers = [{} for _ in range(layers)]
        if len(layers) == 0:
            raise ValueError("layers must not be empty")
        modules, width = [], input_size
        for spec in layers:
            modules.append(TemporalMemory(width, **{**defaults, **dict(spec)}))
            width = modules[-1].output_size
        self.layers = nn.ModuleList(modules)
        self.input_size = input_size
        self.learning = learning
        if learning is not None:
            learning.check(self)
        self.stream_state: State | None = None  # what `step` carries from one call to the next

    def reset(self) -> None:
        """Forget the streams that `step` follows: the next step starts a new sequence."""
        self.stream_state = None

    def step(self, x: torch.Tensor, learn: bool = True) -> StepOutput:
        """One record through the stack: predict, compare with what was predicted, and (with
        `learn`) learn by the rule given at construction. x: (D,) for one stream, or (B, D).
        Gradient rules learn through `forward` and an optimizer; here they only predict."""
        single = x.dim() == 1
        x = x.unsqueeze(0) if single else x
        if self.stream_state is None or next(iter(self.stream_state.values())).shape[0] != x.shape[0]:
            self.stream_state = self.initial_state(x.shape[0], x.device)
        if learn and self.learning is None:
            self.learning = Local()
            self.learning.check(self)
        with torch.no_grad():
            out, self.stream_state = self(x.unsqueeze(1), self.stream_state, learning=self.learning if learn else None)
        top = self.layers[-1]
        cells = out.cells[:, 0]
        result = StepOutput(out.prediction[:, 0], column_activity(cells, top.cells_per_column) > 0, cells,
                            out.anomaly[:, 0])
        return StepOutput(*(t[0] for t in result)) if single else result

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The stack's state as one flat dict, `<layer>.<field>` (what checkpoints hold)."""
        return self.join_states([layer.initial_state(batch_size, device) for layer in self.layers])

    def layer_states(self, state: State) -> list[LayerState]:
        fields = [{} for _ in self.layers]
        for key, value in state.items():
            i, name = key.split(".", 1)
            fields[int(i)][name] = value
        return [LayerState(**f) for f in fields]

    @staticmethod
    def join_states(states: list[LayerState]) -> State:
        return {f"{i}.{name}": value for i, s in enumerate(states) for name, value in s._asdict().items()}

    def step_layers(self, x: torch.Tensor, states: list[State], reset: torch.Tensor | None, rule: LearningRule):
        """One time step through all layers. x: (B, D) -> (steps, new states, local loss)."""
        steps, new_states, local_loss = [], [], x.new_zeros(())
        for i, (layer, state) in enumerate(zip(self.layers, states)):
            if rule.is_local(i):
                # No gradient into the layer below, none from earlier steps, none to build.
                with torch.no_grad():
                    step, state = layer(x.detach(), LayerState(*(v.detach() for v in state)), reset, learn=rule.update)
            else:
                step, state = layer(x, state, reset, learn=rule.structural_update)
                if rule.local_loss_weight > 0:
                    local_loss = local_loss + layer.local_loss(step)
            steps.append(step)
            new_states.append(state)
            x = step.cells
        return steps, new_states, local_loss

    def run(self, x: torch.Tensor, state: State, reset: torch.Tensor | None, rule: LearningRule):
        # Layers whose feedforward maps learn from this chunk by their own loss (a gradient is wanted).
        learning = torch.is_grad_enabled()
        maps = [i for i, layer in enumerate(self.layers) if learning and rule.learns_map(i, layer)]
        hebbian = compiled_rule(rule, self)
        if hebbian is not False and all(fused_supported(layer, hebbian, x) for layer in self.layers):
            out, state, inputs = self.forward_fused(x, state, reset, hebbian)
        else:
            out, state, inputs = self.forward_steps(x, state, reset, rule, keep_inputs=bool(maps))
        for i in maps:  # `TemporalMemory.proximal_loss`, each layer on its own input (B, T, D_i)
            out.local_loss = out.local_loss + self.layers[i].proximal_loss(inputs[i], reset)
        return out, state

    def forward_steps(
        self, x: torch.Tensor, state: State, reset: torch.Tensor | None, rule: LearningRule, keep_inputs: bool = False
    ):
        """`forward` by the torch ops, one step at a time through all layers; also returns each
        layer's input over the chunk (B, T, D_i) with `keep_inputs`, else None."""
        states = self.layer_states(state)
        cells, predicted, prediction, anomaly = [], [], [], []
        inputs = [[] for _ in self.layers]
        local_loss = x.new_zeros(())
        # Masked (sparse) weights are computed once per chunk, not once per step; local
        # feedforward learning therefore takes effect from the next chunk on.
        with parametrize.cached():
            for t in range(x.shape[1]):
                steps, states, loss = self.step_layers(x[:, t], states, None if reset is None else reset[:, t], rule)
                local_loss = local_loss + loss
                if keep_inputs:
                    for layer_inputs, layer_step in zip(inputs, steps):
                        layer_inputs.append(layer_step.x)
                cells.append(steps[-1].cells)
                predicted.append(states[-1].predicted)
                prediction.append(states[0].prediction)
                anomaly.append(steps[0].anomaly)
        out = StackOutput(
            cells=torch.stack(cells, 1),
            predicted=torch.stack(predicted, 1),
            prediction=torch.stack(prediction, 1),
            anomaly=torch.stack(anomaly, 1),
            local_loss=local_loss / x.shape[1],
        )
        inputs = [torch.stack(layer_inputs, 1) for layer_inputs in inputs] if keep_inputs else None
        return out, self.join_states(states), inputs

    def forward_fused(self, x: torch.Tensor, state: State, reset: torch.Tensor | None, hebbian):
        """`forward` on a CPU for a rule whose every layer learns by `hebbian` locally, or, with
        `hebbian` None, for a rule that changes no layer (inference): each layer runs the whole
        chunk in one compiled loop (predictive.fused). Nothing of a layer reaches the layers
        below it then, so the layers can run one after the other. Also returns each layer's
        input over the chunk."""
        from predictive import fused  # numba loads the first time the compiled path runs

        outputs, new_states, inputs = [], [], [x]
        for layer, layer_state in zip(self.layers, self.layer_states(state)):
            *out, layer_state = fused.run_layer(layer, hebbian, inputs[-1], layer_state, reset)
            outputs.append(out)
            new_states.append(layer_state)
            inputs.append(out[0])
        (cells, predicted, _, _), (_, _, prediction, anomaly) = outputs[-1], outputs[0]
        out = StackOutput(cells, predicted, prediction, anomaly, local_loss=x.new_zeros(()))
        return out, self.join_states(new_states), inputs[:-1]
