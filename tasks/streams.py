"""Prequential streams held in memory: B streams of N steps, served as chunks of T steps.

Both streaming tasks (sequence, taxi) build their whole stream up front (it is small: 20,000
symbols, 17,520 taxi records), so chunk i is a slice and any chunk can be produced again,
which is what exact resume needs (`tasks.base.StreamDataModule`).
"""

import math

import numpy as np
import torch

from tasks.base import StreamDataModule


class ArrayStreams(StreamDataModule):
    """Chunks of `chunk` steps from arrays of shape (B, N, ...).

    Every batch also holds "index" (B, T) long: the position of each step in its stream, so
    tasks can record per-element metrics at the right place whatever the chunk length.
    """

    def __init__(self, arrays: dict[str, np.ndarray], chunk: int):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"task.chunk must be >= 1, got {chunk}")
        shapes = {name: a.shape[:2] for name, a in arrays.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"stream arrays must share (B, N), got {shapes}")
        self.streams, self.length = next(iter(shapes.values()))
        self.arrays = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        self.chunk_length = chunk

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.length / self.chunk_length)

    def chunk(self, index: int) -> dict:
        start = index * self.chunk_length
        steps = slice(start, min(start + self.chunk_length, self.length))
        batch = {name: a[:, steps] for name, a in self.arrays.items()}
        batch["index"] = torch.arange(steps.start, steps.stop).expand(self.streams, -1)
        return batch
