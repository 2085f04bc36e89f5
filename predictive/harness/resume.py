"""The checkpoint a run resumes from, read and checked against the run before any training: a
missing, torn or foreign file stops the run with one line naming the path and what is wrong,
not with an error from deep inside torch's loader or halfway through the first step.

Every checkpoint holds `run` (written by `RunSummary`): the run's task, model and learning
choices, their settings, and the number of processes that saved it.
"""

from pathlib import Path

import torch

from predictive.harness.settings import show

# Where things are, not what they are: a resumed run may read its data from another copy.
LOCATIONS = {"data_dir", "root", "output_dir", "download"}


class CheckpointError(ValueError):
    """A checkpoint that this run cannot resume from (or test); the message names the path."""


def load_checkpoint(path, setting: str = "ckpt_path") -> dict:
    """The checkpoint at `path`, on the CPU, or a CheckpointError saying why it cannot be read
    (named as `<setting>=<path>`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{setting}={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn zip, not a zip, pickled objects: torch raises many kinds
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{setting}={path}: truncated or not a checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{setting}={path}: not a training checkpoint (it has no state_dict)")
    return checkpoint


def check_checkpoint(path, module, run: dict | None = None, processes: int = 1, setting: str = "ckpt_path") -> dict:
    """Read the checkpoint at `path` and check that `module` can load it; with `run` (this run's
    `RunSummary.run_info`), also that it was saved by the same task, model, learning mode and
    settings, and, for a streaming task, by as many processes. Returns the checkpoint."""
    checkpoint = load_checkpoint(path, setting)
    problem = None
    if run is not None and "run" in checkpoint:
        problem = other_run(checkpoint["run"], run, processes if module.task.streaming else None)
    problem = problem or other_model(checkpoint, module)
    if problem:
        raise CheckpointError(f"{setting}={path}: {problem}")
    return checkpoint


def load_model(path, model, setting: str = "init_from") -> None:
    """Start `model` from the model saved in the checkpoint at `path` (its layers' maps,
    segments, decoders and buffers; not the head, optimizer or stream state): a second stage
    that trains a fresh head on layers another run learned. A CheckpointError names the path
    when the file cannot be read or its model is not this one."""
    checkpoint = load_checkpoint(path, setting)
    saved = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    expected = {f"model.{k}": v for k, v in model.state_dict().items()}
    problem = misfit(saved, expected)
    if problem:
        raise CheckpointError(f"{setting}={path}: its model does not fit this one: {problem} (give the model "
                              "settings it was saved with)")
    model.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()})


def other_run(saved: dict, run: dict, processes: int | None) -> str | None:
    """What tells the run that saved a checkpoint from this one, or None."""
    for key, value in run["choices"].items():
        if saved.get("choices", {}).get(key, value) != value:
            return f"saved by {key}={saved['choices'][key]}, this run is {key}={value}"
    if processes is not None and saved.get("processes", processes) != processes:
        return (f"saved by {saved['processes']} process(es), this run has {processes}: resume with the devices "
                "and nodes it was saved with")
    before, now = flatten(saved.get("settings", {})), flatten(run["settings"])
    changed = [key for key in sorted(before.keys() | now.keys())
               if key.rsplit(".", 1)[-1] not in LOCATIONS and before.get(key) != now.get(key)]
    if changed:
        shown = "; ".join(f"{k}={show(before.get(k))} there, {show(now.get(k))} here" for k in changed[:3])
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        return f"saved with other settings: {shown}{more}; resume with the overrides it was saved with"
    return None


def other_model(checkpoint: dict, module) -> str | None:
    """Why `module` cannot load the checkpoint's weights and stream state, or None."""
    problem = misfit(checkpoint["state_dict"], module.state_dict())
    if problem:
        return f"does not fit this model: {problem} (saved with other model settings)"
    state = checkpoint.get("stream_state")
    if state is not None:  # a state from another model or version would fail mid-step
        keys = set(module.model.initial_state(1))
        if set(state) != keys:
            return (f"the checkpoint's stream state does not fit this model: missing {sorted(keys - set(state))}, "
                    f"unknown {sorted(set(state) - keys)} (saved by another model or an older version)")
    return None


def misfit(saved: dict, expected: dict) -> str | None:
    """What keeps tensors `saved` from loading where `expected` are (names, then shapes), or None."""
    missing, unknown = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unknown:
        return f"missing {_few(missing)}, unknown {_few(unknown)}"
    for name, value in expected.items():
        if tuple(saved[name].shape) != tuple(value.shape):
            return f"{name} is {_shape(saved[name])} in the checkpoint, {_shape(value)} here"
    return None


def flatten(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _few(names: list[str]) -> str:
    return "[" + ", ".join(names[:3]) + (f", ... {len(names) - 3} more" if len(names) > 3 else "") + "]"


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "a scalar"
