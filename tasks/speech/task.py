"""SpeechTask: spoken-word classification from raw audio, one log-mel frame per time step."""

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from predictive.harness.files import save_figure, write_json
from predictive.harness.settings import COUNT, choice, each, flag, is_number, number, regex
from tasks.base import Task

from . import datasets as ds
from .audio import read_wav, resample
from .augment import Augment
from .continual import PhasedSpeechData, phase_of_clips
from .data import UNLABELLED, SpeechData
from .features import LogMel, frame_energy, voiced_span
from .head import READOUTS, SegmentPoolHead

log = logging.getLogger(__name__)


class SpeechEncoder(nn.Module):
    """batch["audio"] (B, samples) -> (B, frames, output_size) log-mel frames, augmented in
    training. It also puts each frame's log energy of the audio it encoded (augmented or not)
    into batch["frame_energy"] (B, frames), for the head's voiced span."""

    def __init__(self, augment: Augment, logmel: LogMel):
        super().__init__()
        self.augment, self.logmel = augment, logmel
        self.output_size = logmel.output_size

    def forward(self, batch: dict) -> torch.Tensor:
        log_mel = self.logmel.log_mel(self.augment(batch["audio"]))
        batch["frame_energy"] = frame_energy(log_mel)
        return self.logmel.features(log_mel)


def _f_max(value, get):
    rate, f_min = get("sample_rate"), get("f_min")
    if value is None or not (is_number(rate) and is_number(f_min)):
        return number(0, low_open=True, null=True)(value, get)
    return number("f_min", rate / 2, low_open=True, null=True)(value, get)


def _n_fft(value, get):
    rate, win_ms = get("sample_rate"), get("win_ms")
    window = int(rate * win_ms / 1000) if is_number(rate) and is_number(win_ms) else 1
    return None if is_number(value, integer=True) and value >= max(window, 1) else (
        f"an integer >= the window, sample_rate x win_ms / 1000 = {window}")


def _test_percent(value, get):
    val = get("val_percent")
    allowed = number(0, 100 - val if is_number(val) else 100, high_open=is_number(val))(value, get)
    return allowed and f"{allowed} (val_percent + test_percent < 100)"


def _folder_only(value, get):
    return None if value is None or get("dataset") == "folder" else "null unless task.dataset=folder"


def _speaker(value, get):
    return None if isinstance(value, str) and value else "a speaker's name"


def _split_files(value):
    lists = isinstance(value, Mapping) and value and set(value) <= set(ds.SPLITS) and all(
        isinstance(v, str) for v in value.values())
    return None if value is None or lists or (isinstance(value, str) and value.endswith(".csv")) else (
        "a CSV file with file and split columns, or {val: <list file>, test: <list file>[, train: <list file>]}")


class SpeechTask(Task):
    streaming = False
    features = "cells"
    settings = {
        "dataset": choice("fsdd", "speech_commands", "folder"),
        "download": flag(),
        "skip_bad_files": flag(),
        "split": choice("official", "speaker"),
        "test_speaker": _speaker,
        "val_speaker": _speaker,
        "speaker_pattern": lambda value, get: regex(1)(value, get) or _folder_only(value, get),
        "split_files": lambda value, get: _folder_only(value, get) or (
            "null when task.speaker_pattern is set (one or the other)" if value is not None
            and get("speaker_pattern") is not None else None) or _split_files(value),
        "vocabulary": lambda value, get: choice("12", "full")(str(value), get),  # 12 on the command line: an int
        "val_percent": number(0, 100),
        "test_percent": _test_percent,
        "unknown_percent": number(0, null=True),
        "silence_percent": number(0),
        "sample_rate": COUNT,
        "clip_seconds": number(0, low_open=True),
        **{key: COUNT for key in ("n_mels", "segments", "batch_size", "cells_per_column")},
        "n_fft": _n_fft,
        "win_ms": number(0, low_open=True),
        "hop_ms": number(0, low_open=True),
        "f_min": number(0),
        "f_max": _f_max,
        "mel_scale": choice("slaney", "htk"),
        "normalize": choice("utterance", "channel", "none"),
        "deltas": flag(),
        "context_frames": number(0, integer=True),
        "augment.shift_ms": number(0),
        "augment.gain_db": number(0),
        "augment.noise_prob": number(0, 1),
        "augment.noise_volume": number(0),
        "augment.white_noise_prob": number(0, 1),
        "augment.white_noise_max": number(0, 1),
        "voiced_threshold": number(0, 1, high_open=True, null=True),
        "voiced_range_db": number(0, low_open=True, null=True),
        "head_dropout": number(0, 1, high_open=True),
        "head_average": number(0, 1, high_open=True),
        "noise_levels": each(number(0, 1)),
        "noise_seed": number(0, integer=True),
        "readout": choice(*READOUTS),
        "label_fraction": number(0, 1, low_open=True),
        "label_seed": number(0, integer=True),
        "unlabelled_clips": flag(),
    }

    def __init__(
        self,
        dataset="fsdd",
        data_dir="data",
        root=None,
        download=False,
        vocabulary="12",
        split="official",
        test_speaker="theo",
        val_speaker="jackson",
        speaker_pattern=None,
        split_files=None,
        val_percent=10.0,
        test_percent=10.0,
        unknown_percent=10.0,
        silence_percent=10.0,
        skip_bad_files=False,
        sample_rate=16000,
        clip_seconds=1.0,
        n_mels=40,
        n_fft=512,
        win_ms=25.0,
        hop_ms=10.0,
        f_min=20.0,
        f_max=None,
        mel_scale="slaney",
        normalize="utterance",
        deltas=False,
        context_frames=0,
        augment=None,
        segments=4,
        voiced_threshold=None,
        voiced_range_db=None,
        head_dropout=0.0,
        head_average=0.0,
        readout="linear",
        cells_per_column=1,
        noise_levels=tuple(i / 20 for i in range(11)),
        noise_seed=0,
        batch_size=32,
        output_dir=None,
        continual=None,
        label_fraction=1.0,
        label_seed=0,
        unlabelled_clips=False,
    ):
        self.samples = int(round(sample_rate * clip_seconds))
        self.root = ds.find_root(dataset, data_dir, root, download)
        vocabulary = str(vocabulary)  # `task.vocabulary=12` on the command line is a number
        # How the clips were split (summary.json): lists | speaker | official (FSDD's) | per_file
        self.split = split
        if dataset == "speech_commands":
            if vocabulary not in ("12", "full"):
                raise ValueError(f"task.vocabulary must be '12' or 'full', got {vocabulary!r}")
            clips = ds.speech_commands(self.root, val_percent, test_percent)
            self.split = "lists" if (self.root / "validation_list.txt").is_file() else "speaker"
            if vocabulary == "12":
                clips = ds.balance_gsc(clips, self.root, sample_rate, self.samples, unknown_percent, silence_percent)
            label_of = lambda word: ds.gsc_label(word, vocabulary)  # noqa: E731
        elif dataset == "fsdd":
            clips, label_of = ds.fsdd(self.root, split, test_speaker=test_speaker, val_speaker=val_speaker), str
        elif dataset == "folder":
            clips, self.split = ds.folder(self.root, val_percent, test_percent, speaker_pattern, split_files)
            label_of = str
        else:
            raise ValueError(f"task.dataset must be speech_commands | fsdd | folder, got {dataset!r}")
        if dataset == "speech_commands" and vocabulary == "12":
            self.classes = [*ds.GSC_WORDS, ds.SILENCE, ds.UNKNOWN]
        else:
            self.classes = sorted({label_of(c.word) for c in clips})
        settings = ({c: i for i, c in enumerate(self.classes)}, label_of, sample_rate, self.samples, batch_size,
                    skip_bad_files, noise_levels, noise_seed, output_dir, label_fraction, label_seed, unlabelled_clips)
        if continual:  # phases by speaker or class groups (tasks/speech/continual.py)
            self.phases, groups = phase_of_clips(continual, clips, label_of)
            epochs = continual.get("epochs", 1)
            self._data = PhasedSpeechData([SpeechData(part, *settings) for part in groups], epochs)
            self.phase_ends = tuple(epochs * (i + 1) for i in range(len(groups)))
        else:
            self._data = SpeechData(clips, *settings)
        logmel = LogMel(
            sample_rate,
            n_fft,
            int(sample_rate * win_ms / 1000),
            int(sample_rate * hop_ms / 1000),
            n_mels,
            f_min,
            f_max,
            mel_scale,
            normalize=normalize,
            deltas=deltas,
            context_frames=context_frames,
        )
        self.encoder = SpeechEncoder(
            Augment(sample_rate, noise=self._background(sample_rate), **(augment or {})), logmel
        )
        self.input_size = self.encoder.output_size
        self.segments, self.head_dropout, self.head_average = segments, head_dropout, head_average
        self.readout = readout
        self.label_fraction = label_fraction
        self.cells_per_column = cells_per_column
        if voiced_threshold is not None and not (
            isinstance(voiced_threshold, (int, float)) and not isinstance(voiced_threshold, bool)
            and 0.0 <= voiced_threshold < 1.0
        ):
            raise ValueError(f"task.voiced_threshold must be in [0, 1) or null, got {voiced_threshold!r}")
        if voiced_range_db is not None and not (
            isinstance(voiced_range_db, (int, float)) and not isinstance(voiced_range_db, bool) and voiced_range_db > 0
        ):
            raise ValueError(f"task.voiced_range_db must be > 0 or null, got {voiced_range_db!r}")
        self.voiced_threshold, self.voiced_range_db = voiced_threshold, voiced_range_db
        self.noise_levels = list(noise_levels)
        self.output_dir = output_dir
        n = len(self.classes)
        self._accuracy = {s: MulticlassAccuracy(n, average="micro") for s in ("train", "val", "test")}
        self._confusion = MulticlassConfusionMatrix(n)
        self._level_counts = torch.zeros(len(self.noise_levels), 2, dtype=torch.long)  # correct, total
        self._results: dict = {}
        self._computed: set[str] = set()
        self.confusion_png = None  # written by the test stage

    def _background(self, sample_rate):
        """Speech Commands' `_background_noise_` recordings, joined, for augmentation."""
        folder = self.root / ds.NOISE_DIR
        if not folder.is_dir():
            return None
        parts = [resample(*read_wav(p), sample_rate) for p in sorted(folder.glob("*.wav"))]
        return torch.from_numpy(np.concatenate(parts)) if parts else None

    def datamodule(self, rank: int = 0):
        return self._data  # Lightning gives each rank its share of the clips

    def held_out(self, phase: int):
        return self._data.held_out(phase)

    def reset_mask(self, batch):
        """Each clip is its own sequence: clear the state at its first frame."""
        audio = batch["audio"]
        mask = torch.zeros(
            audio.shape[0], self.encoder.logmel.num_frames(audio.shape[1]), dtype=torch.bool, device=audio.device
        )
        mask[:, 0] = True
        return mask

    def build_head(self, feature_size):
        return SegmentPoolHead(
            feature_size, len(self.classes), self.segments, self.head_dropout, self.cells_per_column, self.head_average,
            self.readout,
        )

    def head_inputs(self, x, batch):
        """The head pools over the frames that hold the word (task.voiced_threshold and
        task.voiced_range_db, on the frame energies the encoder put in the batch), widened by the
        spliced context: frames that far from the word still carry part of it."""
        labels = {"label": batch["label"]} if self.readout != "linear" else {}  # a counting readout learns from them
        if self.voiced_threshold is None:
            return labels
        margin = self.encoder.logmel.context_frames
        return {"span": voiced_span(batch["frame_energy"], self.voiced_threshold, margin, self.voiced_range_db),
                **labels}

    def loss(self, head_out, batch):
        labelled = batch["label"] != UNLABELLED  # all, unless task.label_fraction < 1 and task.unlabelled_clips
        if not labelled.any():
            return head_out.sum() * 0.0  # nothing to learn from: a zero loss, no gradient
        return F.cross_entropy(head_out[labelled], batch["label"][labelled])

    def update_metrics(self, stage, head_out, batch, out):
        if stage in self._computed:  # a new epoch of this stage: start counting afresh
            self._computed.discard(stage)
            self._accuracy[stage].reset()
            if stage == "test":
                self._confusion.reset()
                self._level_counts.zero_()
        preds, target = head_out.detach().argmax(-1), batch["label"]
        clean = (batch["noise_level"] == 0) & (target != UNLABELLED)
        self._accuracy[stage] = self._accuracy[stage].to(preds.device)
        if clean.any():
            self._accuracy[stage].update(preds[clean], target[clean])
        if stage == "test":
            self._confusion = self._confusion.to(preds.device)
            if clean.any():
                self._confusion.update(preds[clean], target[clean])
            level = batch["noise_level"].cpu()
            self._level_counts.index_add_(
                0, level, torch.stack([(preds == target).long().cpu(), torch.ones_like(level)], 1)
            )

    def compute_metrics(self, stage):
        """Accuracy of the epoch so far (test: clean clips, plus the noise sweep); the counts
        stay until the stage's next epoch starts, so this can be called again."""
        self._computed.add(stage)
        metrics = {"accuracy": self._accuracy[stage].compute().item()}
        if stage == "test":
            correct, total = self._level_counts.unbind(1)
            by_level = {
                f"{a:g}": (c / max(t, 1)) for a, c, t in zip(self.noise_levels, correct.tolist(), total.tolist())
            }
            metrics["noise_score"] = float(correct.sum())  # correct answers over all levels
            metrics.update({f"noise_accuracy/{a}": v for a, v in by_level.items()})
            self._results.update(
                noise_score=int(correct.sum()),
                noise_accuracy_by_level=by_level,
                confusion_matrix=self._confusion.compute().tolist(),
            )
            self._write_confusion()
            out = Path(self.output_dir or ".").resolve()
            ckpt = out / "checkpoints" / "last.ckpt"
            print(
                f"speech results in {out}: test_accuracy={metrics['accuracy']:.4f}, "
                f"noise_score={int(correct.sum())} (summary.json, confusion_test.png"
                + (f"; re-test: python -m tasks.speech.evaluate ckpt={ckpt})" if ckpt.is_file() else ")"),
                flush=True,
            )
        self._results[f"{stage}_accuracy"] = metrics["accuracy"]
        return metrics

    def _write_confusion(self):
        """confusion_test.png and confusion_test.json (rows: truth, columns: answer)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cm = torch.tensor(self._results["confusion_matrix"])
        out = Path(self.output_dir or ".")
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(1 + 0.45 * len(self.classes),) * 2)
        ax.imshow(cm.numpy(), cmap="Blues")
        ax.set_xticks(range(len(self.classes)), self.classes, rotation=90)
        ax.set_yticks(range(len(self.classes)), self.classes)
        ax.set_xlabel("answer")
        ax.set_ylabel("truth")
        if len(self.classes) <= 15:
            for (i, j), v in zip(
                torch.cartesian_prod(torch.arange(len(cm)), torch.arange(len(cm))).tolist(), cm.flatten().tolist()
            ):
                ax.text(j, i, v, ha="center", va="center", fontsize=7)
        fig.tight_layout()
        self.confusion_png = out / "confusion_test.png"
        save_figure(fig, self.confusion_png, dpi=100)
        plt.close(fig)
        write_json(out / "confusion_test.json", {"classes": self.classes, "matrix": cm.tolist()})

    def figures(self):
        return {"test/confusion": self.confusion_png} if self.confusion_png else {}

    def state_dict(self):
        """The accuracies reported so far: a run resumed after its last epoch trains and
        validates no more, and reports them from here."""
        return {k: v for k, v in self._results.items() if k in ("train_accuracy", "val_accuracy")}

    def load_state_dict(self, state):
        self._results.update(state)

    def summary(self, ranks: list[dict] | None = None):
        # Not streaming: RunSummary gathers no per-process state for it (`ranks` stays None).
        keys = ("test_accuracy", "val_accuracy", "noise_score", "noise_accuracy_by_level")
        if self.phases:  # a continual run's "val" stage is its held-out evaluation: in accuracy_matrix
            keys = tuple(k for k in keys if k != "val_accuracy")
        labels = {}
        if self.label_fraction < 1:
            phases = getattr(self._data, "phases", [self._data])
            labelled = sum(d.labelled_clips or 0 for d in phases)
            labels = {"label_fraction": self.label_fraction, "labelled_clips": labelled}
        return {k: self._results.get(k) for k in keys} | {"classes": self.classes, "split": self.split} | labels
