"""Decoded clips in memory and the LightningDataModule that serves them.

Each split is decoded once (int16, resampled, padded/cropped) when the data module is set up:
before any training, so a bad file stops the run at the start. Speech Commands' 4,890 test
clips take ~150 MB this way and a few seconds to read, so no disk cache is kept.
"""

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .audio import AudioError, fix_length, load_clip, read_wav, resample
from .datasets import SPLITS, Clip

log = logging.getLogger(__name__)


class ClipSet(Dataset):
    """Clips as int16 (N, samples) plus class indices; items are float waveforms in [-1, 1)."""

    def __init__(self, audio: torch.Tensor, labels: torch.Tensor):
        self.audio, self.labels = audio, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"audio": self.audio[i].float() / 32768.0, "label": self.labels[i], "noise_level": torch.tensor(0)}


class EpochShuffle(RandomSampler):
    """A shuffle that depends on (seed, epoch) alone, as Lightning's DistributedSampler does
    under DDP (it replaces this one there): Lightning calls `set_epoch` before each epoch, so a
    run resumed at an epoch boundary sees the orders the uninterrupted run saw."""

    def __init__(self, data, seed: int):
        super().__init__(data, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        self.generator.manual_seed(self.seed + epoch)


class NoiseSweep(Dataset):
    """Every clip at every level alpha: (1 - alpha) * A + alpha * U(-1, 1) (Ahmad & Scheinkman
    2019). Clip j's noise comes from seed (seed, j), so it is the same for any batching."""

    def __init__(self, clips: ClipSet, levels, seed: int):
        self.clips, self.levels, self.seed = clips, list(levels), seed

    def __len__(self):
        return len(self.levels) * len(self.clips)

    def __getitem__(self, i):
        level, j = divmod(i, len(self.clips))
        item = dict(self.clips[j])
        alpha = self.levels[level]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        noise = torch.rand(item["audio"].shape, generator=g) * 2 - 1
        item["audio"] = (1 - alpha) * item["audio"] + alpha * noise
        item["noise_level"] = torch.tensor(level)
        return item


def decode(clips: list[Clip], labels: list[int], sample_rate: int, samples: int, skip_bad_files: bool) -> ClipSet:
    """Decode `clips`; an unreadable file raises AudioError naming it, or with skip_bad_files is
    left out and counted in the log."""
    audio, kept, bad = [], [], []
    noise_cache = {}  # generated `_silence_` clips are crops of a few long noise files
    for clip, label in zip(clips, labels):
        try:
            if clip.start or clip.volume != 1.0:
                if clip.path not in noise_cache:
                    noise_cache[clip.path] = resample(*read_wav(clip.path), sample_rate)
                x = fix_length(noise_cache[clip.path][clip.start : clip.start + samples], samples) * clip.volume
            else:
                x = load_clip(clip.path, sample_rate, samples)
        except AudioError as e:
            if not skip_bad_files:
                raise AudioError(f"{e} (set task.skip_bad_files=true to skip such files)") from e
            bad.append(str(e))
            continue
        audio.append(np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16))
        kept.append(label)
    if bad:
        log.warning("skipped %d unreadable audio files (task.skip_bad_files=true):\n  %s", len(bad), "\n  ".join(bad))
    if not kept:
        raise AudioError(f"no readable clips among {len(clips)} files (first: {clips[0].path})")
    return ClipSet(torch.from_numpy(np.stack(audio)), torch.tensor(kept))


class SpeechData(L.LightningDataModule):
    def __init__(
        self,
        clips: list[Clip],
        label_index: dict[str, int],
        label_of,
        sample_rate: int,
        samples: int,
        batch_size: int,
        skip_bad_files=False,
        noise_levels=(0.0,),
        noise_seed=0,
    ):
        super().__init__()
        self.clips, self.label_index, self.label_of = clips, label_index, label_of
        self.sample_rate, self.samples, self.batch_size = sample_rate, samples, batch_size
        self.skip_bad_files, self.noise_levels, self.noise_seed = skip_bad_files, noise_levels, noise_seed
        self.sets: dict[str, ClipSet] = {}

    def setup(self, stage=None):
        for split in SPLITS:
            if split in self.sets:
                continue
            part = [c for c in self.clips if c.split == split]
            if not part:
                raise ValueError(f"the {split} split is empty; check task.dataset/task.split settings")
            labels = [self.label_index[self.label_of(c.word)] for c in part]
            self.sets[split] = decode(part, labels, self.sample_rate, self.samples, self.skip_bad_files)
            log.info("%s: %d clips", split, len(self.sets[split]))

    # Each loader has its own generator: starting an epoch's iterator then draws nothing from
    # the global RNG, which the augmentation and the model draw from, so the RNG state that a
    # checkpoint holds is the one the next training batch starts from (exact resume).
    def train_dataloader(self):
        shuffle = EpochShuffle(self.sets["train"], seed=torch.initial_seed())  # the run's seed
        return DataLoader(self.sets["train"], self.batch_size, sampler=shuffle, generator=torch.Generator())

    def val_dataloader(self):
        return DataLoader(self.sets["val"], self.batch_size, generator=torch.Generator())

    def test_dataloader(self):
        sweep = NoiseSweep(self.sets["test"], self.noise_levels, self.noise_seed)
        return DataLoader(sweep, self.batch_size, generator=torch.Generator())
