"""Decoded clips in memory and the LightningDataModule that serves them.

Each split is decoded once (int16, resampled, padded/cropped) when the data module is set up:
before any training, so bad files stop the run at the start, every one of them named. Speech Commands' 4,890 test
clips take ~150 MB this way and a few seconds to read, so no disk cache is kept.
"""

import logging
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from predictive.harness.files import write_text

from .audio import AudioError, fix_length, read_wav, resample
from .datasets import SPLITS, Clip

log = logging.getLogger(__name__)
MAX_LISTED = 20  # bad files named in an error or the log; bad_files.txt lists them all


class ClipSet(Dataset):
    """Clips as int16 (N, samples) plus class indices; items are float waveforms in [-1, 1)."""

    def __init__(self, audio: torch.Tensor, labels: torch.Tensor):
        self.audio, self.labels = audio, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"audio": self.audio[i].float() / 32768.0, "label": self.labels[i], "noise_level": torch.tensor(0)}


UNLABELLED = -1  # the label of a training clip whose label is withheld (task.label_fraction < 1)


def labelled_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A bool mask over `labels` (N,): round(fraction x n) clips of each class of n clips (at
    least one), drawn with `seed`. It depends on the labels, fraction and seed alone, so every
    learning mode and model gets the same labelled clips."""
    keep = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep[rng.permutation(members)[: max(1, round(fraction * len(members)))]] = True
    return keep


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


def decode(clips: list[Clip], sample_rate: int, samples: int) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Every clip as int16 samples at `sample_rate`, `samples` long, or None and what is wrong with
    its file (the message starts with the file): unreadable, empty, truncated, not 16-bit PCM,
    non-finite, or at another sample rate than most of the data set's files."""
    audio, problems, rates = [], [], {}
    noise_cache = {}  # generated `_silence_` clips are crops of a few long noise files
    for i, clip in enumerate(clips):
        try:
            if clip.start or clip.volume != 1.0:
                if clip.path not in noise_cache:
                    noise_cache[clip.path] = resample(*read_wav(clip.path), sample_rate)
                x = fix_length(noise_cache[clip.path][clip.start : clip.start + samples], samples) * clip.volume
            else:
                x, rates[i] = read_wav(clip.path)
                x = fix_length(resample(x, rates[i], sample_rate), samples)
            if not np.isfinite(x).all():
                raise AudioError(f"{clip.path}: non-finite samples (NaN or inf)")
        except AudioError as e:
            audio.append(None), problems.append(str(e))
            continue
        audio.append(np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)), problems.append(None)
    common, count = Counter(rates.values()).most_common(1)[0] if rates else (None, 0)
    if 2 * count > len(rates):  # most files share one rate: the data set's
        for i, rate in rates.items():
            if rate != common and problems[i] is None:
                audio[i] = None
                problems[i] = f"{clips[i].path}: sample rate {rate} Hz, the data set's files are {common} Hz"
    return audio, problems


def listing(lines: list[str]) -> str:
    """The first MAX_LISTED lines, indented, and how many more there are."""
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return "  " + "\n  ".join(lines[:MAX_LISTED]) + more


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
        output_dir=None,
        label_fraction=1.0,
        label_seed=0,
        unlabelled_clips=False,
    ):
        super().__init__()
        self.clips, self.label_index, self.label_of = clips, label_index, label_of
        self.sample_rate, self.samples, self.batch_size = sample_rate, samples, batch_size
        self.skip_bad_files, self.noise_levels, self.noise_seed = skip_bad_files, noise_levels, noise_seed
        self.output_dir = output_dir
        # Training clips whose labels are kept; the others are left out (unlabelled_clips false)
        # or kept with the label UNLABELLED, for a model whose layers learn from the audio alone.
        self.label_fraction, self.label_seed, self.unlabelled_clips = label_fraction, label_seed, unlabelled_clips
        self.labelled_clips = None  # training clips with a label, once set up
        self.sets: dict[str, ClipSet] = {}

    def setup(self, stage=None):
        """Decode every split (once: later calls return at once), naming every bad file at once."""
        if self.sets:
            return
        audio, problems = decode(self.clips, self.sample_rate, self.samples)
        bad = list(dict.fromkeys(p for p in problems if p))  # each file once (silence crops share noise files)
        if bad:
            self.report_bad(bad)
        for split in SPLITS:
            keep = [i for i, c in enumerate(self.clips) if c.split == split and audio[i] is not None]
            if not keep:
                raise ValueError(f"the {split} split is empty; check task.dataset/task.split settings")
            labels = np.array([self.label_index[self.label_of(self.clips[i].word)] for i in keep])
            if split == "train" and self.label_fraction < 1:
                labelled = labelled_subset(labels, self.label_fraction, self.label_seed)
                if self.unlabelled_clips:
                    labels[~labelled] = UNLABELLED
                else:
                    keep, labels = [i for i, known in zip(keep, labelled) if known], labels[labelled]
            if split == "train":
                self.labelled_clips = int(np.count_nonzero(labels != UNLABELLED))
            self.sets[split] = ClipSet(torch.from_numpy(np.stack([audio[i] for i in keep])), torch.from_numpy(labels))
            for i in keep:
                audio[i] = None  # held once, in the split's array
            log.info("%s: %d clips%s", split, len(self.sets[split]),
                     f", {self.labelled_clips} labelled" if split == "train" and self.label_fraction < 1 else "")

    def report_bad(self, bad: list[str]):
        """Stop on bad files, naming them (up to MAX_LISTED), or with skip_bad_files leave them out
        and list them all in <output_dir>/bad_files.txt."""
        files = len({c.path for c in self.clips})
        if not self.skip_bad_files:
            raise AudioError(f"{len(bad)} of {files} audio files cannot be used (task.skip_bad_files=true leaves "
                             f"them out and lists them in the run dir's bad_files.txt):\n{listing(bad)}")
        path = Path(self.output_dir or ".") / "bad_files.txt"
        write_text(path, "\n".join(bad) + "\n")
        log.warning("left out %d of %d audio files (task.skip_bad_files=true), listed in %s:\n%s", len(bad), files,
                    path, listing(bad))

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
