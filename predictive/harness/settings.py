"""Every setting of a run checked before anything is built or read: a bad value stops the run with
one line per setting, `<group>.<key>=<value>: <what is allowed>`, not with a traceback from
wherever the value would first have been used.

A rule is a function `(value, get) -> None | str`: None when the value is allowed, else what is
allowed. `get(key)` reads another setting of the same group (else of the run: "model.synapses"), for
limits such as "at most `columns`". The groups' rules are below; a task declares its own as
`settings` on its class (`tasks.base.Task`), so this module knows no task. Settings without a
rule are left to the classes they configure.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from predictive.learning import RULES

Rule = Callable[[Any, Callable[[str], Any]], "str | None"]


class SettingError(ValueError):
    """Invalid settings, one line each."""


def show(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ", ".join(map(show, value)) + "]"
    return str(value)


def is_number(value, integer=False) -> bool:
    return not isinstance(value, bool) and isinstance(value, int if integer else (int, float))


def number(low=None, high=None, *, integer=False, low_open=False, high_open=False, null=False, also=()) -> Rule:
    """A number (an int where `integer`) within [low, high] (or open ends); a limit may be the name
    of another setting. `also`: other allowed values (e.g. -1 for "no limit")."""

    def rule(value, get):
        lo, hi = (get(x) if isinstance(x, str) else x for x in (low, high))
        lo, hi = (x if is_number(x) else None for x in (lo, hi))
        name = lambda x, given: f"{given}={show(x)}" if isinstance(given, str) else show(x)  # noqa: E731
        if lo is not None and hi is not None:
            span = f"in {'(' if low_open else '['}{name(lo, low)}, {name(hi, high)}{')' if high_open else ']'}"
        elif lo is not None:
            span = f"{'>' if low_open else '>='} {name(lo, low)}"
        else:
            span = f"{'<' if high_open else '<='} {name(hi, high)}" if hi is not None else ""
        allowed = " ".join(["an integer" if integer else "a number", span]).strip()
        allowed += "".join(f" or {show(x)}" for x in also) + (" or null" if null else "")
        if (value is None and null) or (is_number(value) and value in also):
            return None
        if not is_number(value, integer):
            return allowed
        too_low = lo is not None and (value < lo or (low_open and value == lo))
        too_high = hi is not None and (value > hi or (high_open and value == hi))
        return allowed if too_low or too_high else None

    return rule


def choice(*options, null=False) -> Rule:
    allowed = ("one of " if len(options) > 1 else "") + " | ".join(map(show, options)) + (" | null" if null else "")
    return lambda value, get: None if (value is None and null) or _member(value, options) else allowed


def _member(value, options) -> bool:
    return any(value == o and isinstance(value, bool) == isinstance(o, bool) for o in options)


def flag(null=False) -> Rule:
    allowed = "true or false" + (" or null" if null else "")
    return lambda value, get: None if isinstance(value, bool) or (value is None and null) else allowed


def each(rule: Rule, count: str | int | None = None, single=False, nonempty=True) -> Rule:
    """A list whose every item passes `rule`; `count`: how many items (a number or a setting);
    `single`: one value (for every item) is allowed too."""

    def check(value, get):
        n = get(count) if isinstance(count, str) else count
        size = f"{n} " if is_number(n) else ""
        allowed = f"a list of {size}values, each {rule(object(), get)}" + (", or one such value" if single else "")
        if single and not _is_list(value):
            return None if rule(value, get) is None else allowed
        if not _is_list(value) or (nonempty and not value) or (is_number(n) and len(value) != n):
            return allowed
        return allowed if any(rule(v, get) for v in value) else None

    return check


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def either(*rules: Rule) -> Rule:
    def check(value, get):
        failed = [rule(value, get) for rule in rules]
        return None if None in failed else ", or ".join(failed)

    return check


def regex(groups=1) -> Rule:
    """A regular expression with at least `groups` groups, or null."""

    def check(value, get):
        if value is None:
            return None
        try:
            ok = isinstance(value, str) and re.compile(value).groups >= groups
        except re.error:
            ok = False
        return None if ok else f"a regular expression with {groups} group(s) (...) or null"

    return check


ROOT = {"seed": number(0, 2**32 - 1, integer=True), "torch_threads": number(1, integer=True, null=True),
        "test": flag()}
OPTIMIZER = {"lr": number(0, low_open=True), "weight_decay": number(0), "momentum": number(0),
             "dampening": number(0), "eps": number(0, low_open=True),
             "betas": each(number(0, 1, high_open=True), 2)}
SCHEDULER = {"T_max": number(1, integer=True), "eta_min": number(0), "step_size": number(1, integer=True),
             "gamma": number(0, low_open=True)}
CHECKPOINT = {"every_n_train_steps": number(0, integer=True, null=True), "save_last": flag(),
              "save_top_k": number(-1, integer=True)}
PROGRESS_BAR = {"refresh_rate": number(0, integer=True)}
PRECISIONS = ("64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "16-true",
              "bf16-true")
TRAINER = {
    "accelerator": choice("cpu", "gpu", "cuda", "mps", "tpu", "auto"),
    "devices": either(number(1, integer=True, also=(-1,)), choice("auto"), each(number(0, integer=True))),
    "num_nodes": number(1, integer=True),
    "precision": choice(*PRECISIONS),
    "max_epochs": number(1, integer=True, also=(-1,), null=True),
    "max_steps": number(1, integer=True, also=(-1,)),
    "deterministic": either(flag(null=True), choice("warn")),
    "log_every_n_steps": number(1, integer=True),
    "num_sanity_val_steps": number(-1, integer=True),
    "enable_progress_bar": flag(),
    "strategy.find_unused_parameters": flag(),
    "strategy.broadcast_buffers": flag(),
}
LOGGER = {"offline": flag(null=True)}
UNIT, FRACTION = number(0, 1), number(0, 1, low_open=True)  # [0, 1], (0, 1]
LEARNING = {
    "rule.name": choice(*RULES),
    **{f"rule.{key}": UNIT for key in ("permanence_increment", "permanence_decrement", "predicted_decrement",
                                        "burst_decrement", "decoder_rate", "decoder_code_rate", "feedforward_rate")},
    "rule.initial_permanence": FRACTION,
    "rule.max_permanence": number("rule.initial_permanence", 1),
    "rule.new_synapses": number(1, "model.synapses", integer=True),
    "rule.connected_grace": number(0, integer=True),
    "rule.proximal_lr": number(0, low_open=True),
    "rule.proximal_chunks": number(0, integer=True),
    **{f"rule.{key}": flag() for key in ("grow_predicted", "decoder_bias", "grow_segments")},
    "rule.fused": lambda value, get: flag()(value, get) or (
        "false for learning=hybrid (its layers run step by step)" if value and get("rule.name") == "hybrid" else None),
    "rule.local_loss_weight": number(0),
    "rule.local_layers": number(0, integer=True),
    "gradient_clip_val": number(0, low_open=True, null=True),
    "learns_unlabelled": flag(),
    "layer.recall": flag(),  # what the mode needs of a temporal-memory model (configs/model/stack.yaml)
    "layer.fresh_steps": number(0, integer=True),
    "layer.initial_segments": choice("empty", "random"),
}
COUNT = number(1, integer=True)
LAYER = {
    **{key: COUNT for key in ("columns", "cells", "segments", "synapses", "duty_cycle_period")},
    "active_columns": either(number(1, "columns", integer=True), number(0, 1, low_open=True)),
    "activation_threshold": number(1, "synapses", integer=True),
    "matching_threshold": number(1, "synapses", integer=True),
    "connected_permanence": number(0, 1, low_open=True, high_open=True),
    "feedforward_sparsity": number(0, 1, high_open=True),
    "boost_strength": number(0),
    "predicted_bias": number(0),
    "sharpness": number(0, low_open=True),
    "soft_kwta": number(0),
    "fresh_steps": number(0, integer=True),
    "first_order_fallback": flag(),
    "recall": flag(),
    "start_cells": flag(),
    "initial_segments": choice("empty", "random"),
    "proximal_ahead": number(0, integer=True),
}
SPARSE = number(0, 1, high_open=True)  # a share of zero weights, [0, 1)
MODELS = {
    "predictive.stack.PredictiveStack": {
        "layers": either(COUNT, each(lambda v, get: None if isinstance(v, Mapping) else "a dict of layer settings")),
        **LAYER,
    },
    "predictive.baselines.LSTMModel": {"hidden_size": COUNT, "num_layers": COUNT},
    "predictive.baselines.ConvNet": {
        **{key: COUNT for key in ("channels", "kernel_size", "layers", "duty_cycle_period")},
        "frequency_bins": number(1, integer=True, null=True),
        "activity": each(number(0, 1, low_open=True, null=True), "layers", single=True),
        "weight_sparsity": each(SPARSE, "layers", single=True),
        "hidden": number(0, integer=True),
        "hidden_activity": FRACTION,
        "hidden_weight_sparsity": SPARSE,
        "boost_strength": number(0),
        "boost_strength_factor": FRACTION,
        "k_inference_factor": number(1),
    },
}


def check_settings(cfg: DictConfig) -> None:
    """Raise SettingError naming every setting of `cfg` (a run's composed config) that its rule
    rejects, one line each."""
    groups = [("", ROOT), ("optimizer", OPTIMIZER), ("scheduler", SCHEDULER), ("checkpoint", CHECKPOINT),
              ("progress_bar", PROGRESS_BAR), ("trainer", TRAINER), ("logger", LOGGER), ("learning", LEARNING),
              ("model", MODELS.get(_select(cfg, "model._target_"), {})), ("task", _task_rules(cfg))]
    errors = [error for group, rules in groups for error in _check_group(cfg, group, rules)]
    errors += _check_layers(cfg)
    epochs = _select(cfg, "trainer.max_epochs")
    if _select(cfg, "scheduler") and not (is_number(epochs, True) and epochs >= 1):  # -1: Lightning's "no limit"
        errors.append(f"trainer.max_epochs={show(epochs)}: an integer >= 1 with a scheduler (it steps once per epoch)")
    if errors:
        raise SettingError("\n".join(errors))


def _task_rules(cfg) -> dict:
    target = _select(cfg, "task._target_")
    try:
        return getattr(get_class(target), "settings", {}) if target else {}
    except ImportError:
        return {}  # Hydra names the missing class when it builds the task


def _check_group(cfg, group: str, rules: dict, node=None, label=None) -> list[str]:
    node = (_select(cfg, group) if group else cfg) if node is None else node
    if not isinstance(node, Mapping):
        return []
    label = label or group
    errors = []
    for key, rule in rules.items():
        present, value = _lookup(node, key)
        if present:
            allowed = rule(value, lambda name: _get(cfg, node, name))
            if allowed:
                errors.append(f"{label + '.' if label else ''}{key}={show(value)}: {allowed}")
    return errors


def _check_layers(cfg) -> list[str]:
    """model.layers given as a list of per-layer settings: each layer's, over the shared ones."""
    layers = _select(cfg, "model.layers")
    if _select(cfg, "model._target_") != "predictive.stack.PredictiveStack" or not _is_list(layers):
        return []
    shared = {k: v for k, v in _select(cfg, "model").items() if k != "layers"}
    return [error for i, spec in enumerate(layers) if isinstance(spec, Mapping)
            for error in _check_group(cfg, "model", {k: r for k, r in LAYER.items() if k in spec},
                                      node={**shared, **spec}, label=f"model.layers[{i}]")]


def _get(cfg, node, key: str):
    """A setting of the group `node`, else of the run."""
    present, value = _lookup(node, key)
    return value if present else _select(cfg, key)


def _lookup(node, key: str):
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, _plain(node)


def _select(cfg, key: str):
    return _plain(OmegaConf.select(cfg, key, default=None)) if isinstance(cfg, DictConfig) else _lookup(cfg, key)[1]


def _plain(value):
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
