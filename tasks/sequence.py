"""SequenceTask: the high-order sequence prediction task of Cui, Ahmad & Hawkins 2016, learned
and scored prequentially (predict the next element, see it, learn).

At every step t the head scores each sequence symbol as the element t+1. Only predictions of
a sequence's last element count (the element that depends on the sequence's first one); the
curve is the accuracy over the last `window` scored sequences. Stream and metric definitions
are in `tasks.high_order`.
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from predictive.harness.files import write_text
from predictive.harness.settings import COUNT, choice, flag, number
from tasks import high_order
from tasks.base import Task
from tasks.encoders import SymbolEncoder
from tasks.streams import ArrayStreams

FEATURES = ("auto", "prediction", "predicted", "cells")
RELABEL = ("shared", "per_stream")


class SymbolInput(nn.Module):
    """batch["symbol"] (B, T) -> (B, T, size) fixed sparse codes."""

    def __init__(self, codes: SymbolEncoder):
        super().__init__()
        self.codes = codes

    def forward(self, batch: dict) -> torch.Tensor:
        return self.codes(batch["symbol"])


class OverlapHead(nn.Module):
    """Scores each symbol by the share of its code's bits in the model's decoded prediction
    of the next input (HTM's classifier: overlap of predicted columns with each code). No
    learned readout, so the answer is available as soon as the model predicts; a learned
    `sharpness` only scales the scores for the cross-entropy."""

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes / codes.sum(1, keepdim=True), persistent=False)
        self.sharpness = nn.Parameter(torch.tensor(10.0))

    def forward(self, prediction: torch.Tensor) -> torch.Tensor:
        return self.sharpness * prediction @ self.codes.T


def stream_arrays(streams: list[high_order.Stream]) -> dict[str, np.ndarray]:
    """The (B, N) arrays of B streams that batches are cut from."""
    symbols = np.stack([s.symbols for s in streams])
    scored = np.stack([s.scored for s in streams])
    # The prediction made at t is of element t+1; -1 marks "no next element".
    next_symbol = np.concatenate([symbols[:, 1:], np.full((len(symbols), 1), -1)], axis=1)
    next_scored = np.concatenate([scored[:, 1:], np.zeros((len(symbols), 1), bool)], axis=1)
    return {"symbol": symbols, "next": next_symbol, "next_scored": next_scored,
            "start": np.stack([s.start for s in streams])}


def load_set(endings, data_dir, set="published", set_symbols=16, set_sequences=16, set_middle=9, set_seed=0):
    """(normal, perturbed, text): the published sets, generated ones, or a file's (see
    SequenceTask), and their sequences.json text, with how they were made."""
    if set == "generated":
        normal, perturbed = high_order.generate_sets(set_symbols, set_sequences, set_middle, endings, set_seed)
    else:
        normal, perturbed = high_order.load_sets(endings, None if set == "published" else Path(data_dir) / set)
    about = {"set": str(set)} | ({"symbols": set_symbols, "sequences": set_sequences, "middle": set_middle,
                                  "seed": set_seed} if set == "generated" else {})
    return normal, perturbed, high_order.sets_json({endings: (normal, perturbed)}, **about)


class PhaseSets:
    """The sets of a continual run (`SequenceTask(continual=...)`), one per phase, and the
    streams made of them: stream s learns set i from its element i x phase_length on, in the
    order and noise of seed (s, i); phase j's held-out stream e has seed (seed, j, -1 - e)."""

    KEYS = ("sets", "phase_length", "held_out_streams", "held_out_length")

    def __init__(self, spec: dict, own: dict, endings: int, data_dir, chunk: int):
        spec = dict(spec)
        unknown = set(spec) - set(self.KEYS)
        if unknown or "sets" not in spec:
            raise ValueError(f"task.continual: settings are {list(self.KEYS)} (sets required), got {sorted(spec)}")
        self.phase_length = spec.get("phase_length", 8000)
        self.streams, self.held_out_length = spec.get("held_out_streams", 4), spec.get("held_out_length", 500)
        if not (isinstance(self.phase_length, int) and self.phase_length > 0 and self.phase_length % chunk == 0):
            raise ValueError(f"task.continual.phase_length={self.phase_length} must be a positive multiple of "
                             f"task.chunk={chunk} (phases end between chunks)")
        if self.streams < 1 or self.held_out_length < 50:
            raise ValueError(f"task.continual: held_out_streams >= 1 and held_out_length >= 50, got "
                             f"{self.streams} and {self.held_out_length}")
        self.sets, self.names, self.files = [], [], {}
        for i, phase in enumerate(spec["sets"]):
            settings = own | dict(phase)
            normal, _, self.files[f"sequences_phase{i}.json"] = load_set(endings, data_dir, **settings)
            self.sets.append(normal)
            seed = f"-{settings['set_seed']}" if settings["set"] == "generated" else ""
            self.names.append(f"{i}:{Path(str(settings['set'])).stem}{seed}")
        sizes = {1 + max(max(s) for s in normal) for normal in self.sets}
        if len(self.sets) < 1 or len(sizes) != 1:
            raise ValueError(f"task.continual.sets: one or more sets over the same symbols, got symbol counts "
                             f"{[1 + max(max(s) for s in normal) for normal in self.sets]}")
        self.length = len(self.sets) * self.phase_length
        self.ends = tuple((i + 1) * self.phase_length // chunk for i in range(len(self.sets)))

    def stream(self, seed: int, relabel_seed: int) -> high_order.Stream:
        parts = [high_order.generate(normal, normal, seed_of(seed, i), self.phase_length, self.phase_length,
                                     relabel_seed) for i, normal in enumerate(self.sets)]
        return high_order.concatenate(parts)

    def held_out(self, phase: int, seed: int) -> list[high_order.Stream]:
        normal = self.sets[phase]
        return [high_order.generate(normal, normal, seed_of(seed, phase, -1 - e), self.held_out_length,
                                    self.held_out_length, seed) for e in range(self.streams)]


def seed_of(*key: int) -> int:
    """One integer seed from a tuple of them (numpy's SeedSequence: distinct tuples, unrelated seeds)."""
    return int(np.random.SeedSequence([k % 2**32 for k in key]).generate_state(1)[0])


class SequenceTask(Task):
    """The high-order sequence stream (`tasks.high_order`).

    Args:
        data_dir: data root, for a relative path in `set`.
        set: "published" (Cui et al. 2016, `tasks.high_order_sets`), "generated" (drawn by
            `tasks.high_order.generate_sets` from set_symbols, set_sequences, set_middle and
            set_seed), or a file in the schema of `sequences.json` (absolute, or under data_dir).
            The sets a run used are written to <output_dir>/sequences.json.
        endings: 1 | 2 | 4 possible endings per shared subsequence; a prediction is right when
            the truth is among the top `endings` symbols.
        streams: B streams learned at once as one batch by one model, stream i from seed
            `seed + i` (its sequence order and noise), each scored on its own. Not B independent
            runs: the streams share the layers' synapses.
        relabel: "shared": every stream relabels the symbols as stream 0 (seed `seed`) does, so
            the B streams are B samples of one task; "per_stream": stream i relabels by its own
            seed, so one model holds B different tasks over the same 10 symbols, B x the
            contexts per column (it needs about B x the cells; docs/results.md). Equal for B=1.
        features: "prediction" (the bottom layer's decoded next input, scored by overlap with
            each symbol's code) or "predicted" / "cells" (a linear head trained by the task
            loss); "auto": "prediction" for one ending, "predicted" for 2 and 4. With several
            endings the layer predicts their union, and a decoded union ranks symbols that
            share columns with the endings above them (endings=4: 0.73 top-4); a linear
            readout of the predicted cells learns which cells mean which endings (1.00).
        resets: reset the model before every sequence (off in the paper's protocol).
        chunk: time steps per batch (the truncation length of BPTT).
        continual: None, or the phases of a continual run (predictive.harness.continual), a
            dict: `sets`, a list of sets (each a dict of the `set*` settings above, the task's
            own filling in the rest) learned one after another for `phase_length` elements
            each (the stream is its phases: `length` and `switch_after` do not apply), and
            each phase's held-out data, `held_out_streams` fresh streams of its set of
            `held_out_length` elements (their own seeds, the run's relabelling), whose scored
            endings the model predicts with learning off. Every set must use the same symbols.
    """

    streaming = True
    settings = {
        "endings": choice(*high_order.ENDINGS),
        **{key: COUNT for key in ("streams", "length", "chunk", "code_size", "window")},
        "relabel": choice(*RELABEL),
        "seed": number(0, integer=True),
        "switch_after": number(0, integer=True),
        "features": choice(*FEATURES),
        "resets": flag(),
        "code_active": number(1, "code_size", integer=True),
        **{key: COUNT for key in ("set_symbols", "set_sequences", "set_middle")},
        "set_seed": number(0, integer=True),
    }

    def __init__(
        self,
        data_dir="data",
        set="published",
        set_symbols=16,
        set_sequences=16,
        set_middle=9,
        set_seed=0,
        output_dir=None,
        endings=1,
        streams=1,
        relabel="shared",
        seed=0,
        length=20000,
        switch_after=10000,
        chunk=50,
        features="auto",
        resets=False,
        code_size=2048,
        code_active=41,
        window=100,
        continual=None,
    ):
        if streams < 1:
            raise ValueError(f"task.streams must be >= 1, got {streams}")
        if relabel not in RELABEL:
            raise ValueError(f"task.relabel must be one of {RELABEL}, got {relabel!r}")
        if features not in FEATURES:
            raise ValueError(f"task.features must be one of {FEATURES}, got {features!r}")
        if window < 1:
            raise ValueError(f"task.window must be >= 1, got {window}")
        if features == "auto":
            features = "prediction" if endings == 1 else "predicted"
        own = dict(set=set, set_symbols=set_symbols, set_sequences=set_sequences, set_middle=set_middle,
                   set_seed=set_seed)
        self._phases = None
        if continual:
            if relabel != "shared":
                raise ValueError("task.continual needs task.relabel=shared (held-out streams relabel as stream 0)")
            self._phases = PhaseSets(continual, own, endings, data_dir, chunk)
            self.phases, self.phase_ends = self._phases.names, self._phases.ends
            length = switch_after = self._phases.length
            normal = perturbed = None
            files = self._phases.files
        else:
            normal, perturbed, text = load_set(endings, data_dir, **own)
            files = {"sequences.json": text}
        self._files = None if output_dir is None else {Path(output_dir) / name: text for name, text in files.items()}
        self._sets = (normal, perturbed, length, switch_after)
        self._relabel_seed = seed if relabel == "shared" else None
        self.seed, self.rank, self.streams = seed, 0, self._generate(seed, streams)
        self.endings, self.features, self.resets, self.chunk, self.window = endings, features, resets, chunk, window
        self.num_symbols = self.streams[0].num_symbols
        codes = SymbolEncoder(self.streams[0].vocab_size, code_size, code_active, seed=seed)
        self.encoder = SymbolInput(codes)
        self.input_size = code_size
        self.length = length
        self._correct = np.full((streams, length), -1, dtype=np.int8)  # -1: not scored (yet)
        self._anomaly = np.full((streams, length), np.nan)
        # What the logged metrics need, kept as the stream goes: reading the whole rows at every
        # logged step cost O(length) each, 70 ms (140 us per element) on a 1,000,000-element stream.
        self._seen = np.zeros(streams, dtype=np.int64)  # elements seen per stream
        self._anomaly_sum, self._anomaly_count = 0.0, 0
        self._seconds, self._elements, self._last = 0.0, 0, None
        self._held_out, self._held_out_read = [0, 0], False  # held-out endings right, scored (stage "val")

    def write_inputs(self) -> None:
        """The sets this run streams, to <output_dir>/sequences.json (a continual run: one
        sequences_phase<i>.json per phase), each readable as `task.set`."""
        for path, text in (self._files or {}).items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, text)

    def _generate(self, first_seed: int, count: int) -> list[high_order.Stream]:
        normal, perturbed, length, switch_after = self._sets
        if self._phases is not None:
            return [self._phases.stream(first_seed + i, self._relabel_seed) for i in range(count)]
        return [
            high_order.generate(normal, perturbed, first_seed + i, length, switch_after, self._relabel_seed)
            for i in range(count)
        ]

    def held_out(self, phase: int) -> list[dict]:
        """Phase `phase`'s held-out data: one batch of `held_out_streams` fresh streams of its set."""
        streams = self._phases.held_out(phase, self.seed)
        arrays = {k: torch.from_numpy(v) for k, v in stream_arrays(streams).items()}
        arrays["index"] = torch.arange(arrays["symbol"].shape[1]).expand(len(streams), -1)
        return [arrays]

    def _rank_streams(self, rank: int) -> list[high_order.Stream]:
        b = len(self.streams)
        return self._generate(self.seed + rank * b, b)

    def datamodule(self, rank: int = 0) -> ArrayStreams:
        """Under DDP, rank r learns and scores streams seed + r B .. seed + r B + B - 1
        (relabelled as `relabel` says), so the ranks do not all learn the same streams."""
        if rank != self.rank:
            self.rank, self.streams = rank, self._rank_streams(rank)
        return ArrayStreams(stream_arrays(self.streams), self.chunk)

    def reset_mask(self, batch):
        return batch["start"] if self.resets else None

    def build_head(self, feature_size: int) -> nn.Module:
        if self.features == "prediction":
            if feature_size != self.input_size:
                raise ValueError(f"features=prediction needs the input width {self.input_size}, got {feature_size}")
            return OverlapHead(self.encoder.codes.codes(torch.arange(self.num_symbols)))
        return nn.Linear(feature_size, self.num_symbols)

    def loss(self, head_out, batch):
        # Learn every next element that is a sequence symbol (noise cannot be predicted).
        target = batch["next"]
        known = (target >= 0) & (target < self.num_symbols)
        if not known.any():
            return head_out.sum() * 0.0
        return F.cross_entropy(head_out[known], target[known])

    def update_metrics(self, stage, head_out, batch, out):
        if stage == "val":  # held-out streams (continual runs): their scored endings
            self._count_held_out(head_out, batch)
        if stage != "train":  # the stream is learned and scored in one prequential pass
            return
        now = time.perf_counter()
        if self._last is not None:  # time of one whole chunk cycle, the first one excluded
            self._seconds += now - self._last
            self._elements += batch["symbol"].numel()
        self._last = now
        index = batch["index"].cpu().numpy()
        rows = np.arange(len(index))[:, None]
        anomaly = out.anomaly.float().cpu().numpy()
        self._anomaly[rows, index] = anomaly
        self._anomaly_sum += float(anomaly.sum(dtype=np.float64))
        self._anomaly_count += anomaly.size
        self._seen = np.maximum(self._seen, index[:, -1] + 1)
        scored = batch["next_scored"].cpu().numpy()
        if scored.any():
            b, t = np.nonzero(scored)
            truth = batch["next"].cpu().numpy()[b, t]
            scores = head_out.detach()[torch.as_tensor(b), torch.as_tensor(t)].float().cpu().numpy()
            self._correct[b, index[b, t] + 1] = high_order.is_correct(scores, truth, self.endings)

    def _count_held_out(self, head_out, batch):
        if self._held_out_read:  # the last count was read: a new evaluation starts
            self._held_out, self._held_out_read = [0, 0], False
        self._last = None  # the chunk cycle around an evaluation is not training time
        b, t = np.nonzero(batch["next_scored"].cpu().numpy())
        truth = batch["next"].cpu().numpy()[b, t]
        scores = head_out.detach()[torch.as_tensor(b), torch.as_tensor(t)].float().cpu().numpy()
        correct = high_order.is_correct(scores, truth, self.endings)
        self._held_out = [self._held_out[0] + int(correct.sum()), self._held_out[1] + len(correct)]

    def _stream_summary(self, correct: np.ndarray, anomaly: np.ndarray, switch: int) -> dict:
        positions = np.flatnonzero(correct >= 0)
        s = high_order.summarize(positions, correct[positions], self.length, switch, self.window)
        seen = ~np.isnan(anomaly)
        s["mean_anomaly"] = float(anomaly[seen].mean()) if seen.any() else None
        return s

    def compute_metrics(self, stage):
        if stage == "val":
            self._held_out_read = True
            hits, total = self._held_out
            return {"accuracy": hits / total} if total else {}
        if stage != "train":
            return {}
        last = [a for a in map(self._recent, self._correct, self._seen) if a is not None]
        metrics = {"accuracy": float(np.mean(last))} if last else {}
        if self._anomaly_count:
            metrics["anomaly"] = self._anomaly_sum / self._anomaly_count
        return metrics

    def _recent(self, correct: np.ndarray, seen: int) -> float | None:
        """A stream's accuracy over its last `window` scored elements (the curve's latest value),
        from the end of its row alone; None before `window` are scored."""
        span = 16 * self.window
        while True:
            tail = correct[max(seen + 1 - span, 0) : seen + 1]  # element seen + 1 is scored once seen
            outcomes = tail[tail >= 0]
            if len(outcomes) >= self.window:
                return np.count_nonzero(outcomes[-self.window :]) / self.window
            if span > seen:
                return None
            span *= 4

    def _curve(self, correct: np.ndarray) -> np.ndarray:
        """One stream's accuracy curve from its row of scored positions (-1: not scored)."""
        positions = np.flatnonzero(correct >= 0)
        return high_order.accuracy_curve(positions, correct[positions], self.length, self.window)

    def summary(self, ranks: list[dict] | None = None):
        """The task's figures; with several streams the mean over streams plus `<key>_std`
        (a figure that is undefined in any stream is None). us_per_element is wall time per
        element of one stream divided by the number of streams (throughput). Under DDP
        (`ranks`: every process's `state_dict`, in rank order) over every process's streams."""
        if ranks is None:
            ranks, streams = [self.state_dict()], [self.streams]
        else:
            streams = [self._rank_streams(r) for r in range(len(ranks))]
        per_stream = [
            self._stream_summary(state["correct"][i].numpy(), state["anomaly"][i].numpy(), stream.switch)
            for state, own in zip(ranks, streams) for i, stream in enumerate(own)
        ]
        out = {}
        for key in per_stream[0]:
            values = [s[key] for s in per_stream]
            defined = all(v is not None for v in values)
            if len(values) == 1:  # the paper's protocol: the stream's own figure (ints stay ints)
                out[key] = values[0]
                continue
            out[key] = float(np.mean(values)) if defined else None
            out[f"{key}_std"] = float(np.std(values)) if defined else None
        elements = sum(state["elements"] for state in ranks)  # the processes ran side by side
        out["us_per_element"] = 1e6 * max(state["seconds"] for state in ranks) / elements if elements else None
        out["streams"] = len(per_stream)
        return out

    def curves(self, ranks: list[dict] | None = None):
        """The mean accuracy curve over the streams (under DDP, `ranks` as in `summary`: over
        every process's streams)."""
        rows = self._correct if ranks is None else np.concatenate([r["correct"].numpy() for r in ranks])
        curve = np.mean([self._curve(row) for row in rows], axis=0)
        defined = np.flatnonzero(~np.isnan(curve))
        return {"accuracy": ((defined + 1).tolist(), curve[defined].tolist())}

    def state_dict(self):
        return {
            "correct": torch.from_numpy(self._correct.copy()),
            "anomaly": torch.from_numpy(self._anomaly.copy()),
            "seconds": self._seconds,
            "elements": self._elements,
            "anomaly_sum": self._anomaly_sum,
            "anomaly_count": self._anomaly_count,
        }

    def load_state_dict(self, state):
        self._correct = state["correct"].numpy().copy()
        self._anomaly = state["anomaly"].numpy().copy()
        seen = ~np.isnan(self._anomaly)
        self._seen = seen.sum(1)
        self._anomaly_sum = state.get("anomaly_sum", float(self._anomaly[seen].sum()))
        self._anomaly_count = state.get("anomaly_count", int(seen.sum()))
        self._seconds, self._elements, self._last = state["seconds"], state["elements"], None
