"""Files a run writes, whole or not at all: each is written to a temporary file beside it and
moved into place with `os.replace`, so a run killed at any moment leaves the previous version or
the new one, never a torn file (a `last.ckpt` cut short would lose the point to resume from)."""

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


@contextmanager
def atomic_write(path, mode: str = "w"):
    """`with atomic_write(path) as f: f.write(...)`: the file appears at `path` complete, once the
    block ends without an error (mode "w" for text, "wb" for bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    temp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        # os.open applies the umask, as a plain open() of `path` would (mkstemp makes 0600 files).
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _remove_stale(path: Path) -> None:
    """Remove what a killed writer of `path` left: temporary files of processes that are gone."""
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = temp.name[len(path.name) + 2 :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            temp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_text(path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path, obj: Any, **kwargs) -> None:
    write_text(path, json.dumps(obj, **kwargs) + "\n")


def save_figure(fig, path, **kwargs) -> None:
    """A matplotlib figure to `path` (the format from its suffix), atomically."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip("."), **kwargs)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic in the checkpoint's own folder. Lightning's own
    writes to the system's temporary folder and moves the file over: on another file system
    (a cluster's scratch space) that move copies into the checkpoint in place, and a kill during
    the copy leaves a torn `last.ckpt`. Remote paths (s3://...) go to Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)
