"""NabTask: the Numenta Anomaly Benchmark (NAB v1.1), run and scored.

Protocol (NAB's rules): every file of the corpus is streamed from its first record with a
fresh model (no state, weights or statistics carried from one file to the next), one record
at a time in file order, with one set of settings for every file; the score reported for
record t uses records <= t only; the labels are read only to score and to fill the `label`
column of the results files. Files are independent, so they run in `workers` processes.

Per record the detector reports an anomaly score in [0, 1]: HTM's anomaly likelihood of the
raw scores (`task.score=likelihood`, the default) or the raw score itself (`raw`), and 1 where
the value leaves the range seen so far by more than `spatial_tolerance` x that range (the rule
of NAB's HTM detector; null: off).

Outputs in the run dir: `nab/<detector>/<group>/<detector>_<file>.csv` (NAB's layout, so NAB's
own run.py scores it unchanged), `summary.json` (the three normalised scores, per-group
scores, thresholds, timing), `files.csv` (per file), and `nab_<file>.png` pictures.
"""

import csv
import functools
import multiprocessing
import operator
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from predictive.harness.files import atomic_write, write_json
from predictive.harness.settings import COUNT, FRACTION, UNIT, choice, flag, number
from tasks.base import CorpusTask
from tasks.nab import corpus
from tasks.nab.detector import Settings, detect, encoder_for
from tasks.nab.likelihood import anomaly_likelihood, spatial_anomaly
from tasks.nab.plots import plot_file
from tasks.nab.scoring import PROFILES, SUMMARY_KEYS, probation_length, score_corpus

PLOTS = ("realKnownCause/nyc_taxi.csv", "realKnownCause/machine_temperature_system_failure.csv",
         "realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv", "artificialWithAnomaly/art_daily_jumpsup.csv")


def _detector_name(value, get):
    return None if value is None or re.fullmatch(r"[A-Za-z0-9]+", str(value)) else (
        "letters and digits (NAB splits names on '_') or null")


def _file_names(value, get):
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return None if ok else "a list of the corpus's files, <group>/<name>.csv"


class NabTask(CorpusTask):
    """Args:
        data_dir: data root; the corpus is <data_dir>/nab (data/, labels/) unless `root` is set.
        download: fetch NAB's data and labels from github.com/numenta/NAB if they are missing.
        detector: the detector's name in the results layout (letters and digits: NAB splits on "_");
            None: "predictive" + the learning rule's name (+ the model's, unless it is the stack).
        score: "likelihood" (HTM's anomaly likelihood of the raw scores) or "raw".
        files: a subset of the label file's list (quick runs; scored over the subset, marked
            incomplete); null: the whole corpus.
        records: only the first N records of each file, and the windows within them (tests).
        workers: processes running files in parallel (1: in this process).
        skip_bad: leave bad rows out of detection (score 0) and list them, instead of stopping.
        clock_change_minutes: how far a time may go back (or repeat) before it is bad input.
        detector_settings: chunk, value_size ... raw: `tasks.nab.detector.Settings`.
        spatial_tolerance: score 1 where a value leaves the range so far by this fraction of it.
        averaging, history, reestimate: the likelihood's settings (`tasks.nab.likelihood`).
        hebbian: the local rule's settings for NAB, over the learning config's, under the
            rules that learn by it (local, hybrid).
        plots: files to draw.
    """

    settings = {
        "download": flag(),
        "skip_bad": flag(),
        "detector": _detector_name,
        "score": choice("likelihood", "raw"),
        "records": number(10, integer=True, null=True),
        "workers": COUNT,
        "clock_change_minutes": number(0),
        "plots": _file_names,
        "chunk": number(1, integer=True, null=True),
        "value_size": COUNT,
        "value_active": number(1, "value_size", integer=True),
        **{f"{key}_size": number(0, integer=True) for key in ("time", "day")},
        **{f"{key}_active": COUNT for key in ("time", "day")},
        "value_margin": number(0),
        "raw": choice("auto", "columns", "error"),
        "ensemble": COUNT,
        "hebbian.initial_permanence": FRACTION,
        "hebbian.predicted_decrement": UNIT,
        "hebbian.max_permanence": FRACTION,
        "spatial_tolerance": number(0, null=True),
        **{key: COUNT for key in ("averaging", "history", "reestimate")},
    }

    def __init__(self, data_dir="data", root=None, download=False, detector=None, score="likelihood", files=None,
                 records=None, workers=2, skip_bad=False, clock_change_minutes=60, spatial_tolerance=0.05,
                 averaging=10, history=4000, reestimate=100, hebbian=None, plots=PLOTS, **detector_settings):
        unknown = sorted(set(detector_settings) - set(Settings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"task: unknown settings {', '.join(unknown)}")
        if _detector_name(detector, None):
            raise ValueError(f"task.detector must be {_detector_name(detector, None)}, got {detector!r}")
        if score not in ("likelihood", "raw"):
            raise ValueError(f"task.score must be 'likelihood' or 'raw', got {score!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"task.workers must be an integer >= 1, got {workers!r}")
        if records is not None and records < 10:
            raise ValueError(f"task.records must be >= 10 or null, got {records}")
        if spatial_tolerance is not None and spatial_tolerance < 0:
            raise ValueError(f"task.spatial_tolerance must be >= 0 or null, got {spatial_tolerance}")
        if min(averaging, history, reestimate) < 1:
            raise ValueError("task.averaging, task.history and task.reestimate must be >= 1")
        self.settings = Settings(**detector_settings)
        self.root = Path(root) if root is not None else Path(data_dir) / "nab"
        if download:
            corpus.fetch(self.root)
        self.detector, self.score, self.workers, self.spatial_tolerance = detector, score, workers, spatial_tolerance
        self.likelihood = {"averaging": averaging, "history": history, "reestimate": reestimate}
        self.plots = list(plots or [])
        self.hebbian = dict(hebbian or {})
        labels = self.root / "labels" / "combined_windows.json"
        if not labels.is_file():
            raise FileNotFoundError(f"no NAB corpus at {self.root} ({labels} is missing): set paths.data_dir (or "
                                    "PREDICTIVE_DATA_DIR) or task.root, or task.download=true to fetch it")
        windows = corpus.load_windows(labels)
        names = corpus.corpus_files(self.root / "data", windows, None if files is None else list(files))
        self.complete = files is None and records is None
        # Every file is read and checked now, before any long work starts.
        self.series = {n: corpus.read_series(self.root / "data" / n, n, skip_bad, clock_change_minutes)
                       for n in names}
        if records is not None:
            self.series = {n: corpus.truncate(s, records) for n, s in self.series.items()}
        self.windows = {n: corpus.windows_within(windows[n], self.series[n]) for n in names}
        self.sweeps = {n: corpus.sweep_of(self.series[n], self.windows[n]) for n in names}
        self.input_size = self.settings.value_size + self.settings.time_size + self.settings.day_size

    def run(self, cfg, info: dict, logger=None) -> dict:
        out = Path(cfg.paths.output_dir)
        if self.detector is None:  # e.g. predictivelocal (a PredictiveStack), predictivebackproplstm
            stack = str(cfg.model.get("_target_", "")).endswith("PredictiveStack")
            model = "" if stack else re.sub(r"[^A-Za-z0-9]", "", str(info.get("model", "")))
            self.detector = f"predictive{info.get('learning', 'local')}{model}"
        self.check_model(cfg)
        start = time.perf_counter()
        raw, seconds = self.detect_all(cfg)
        wall = time.perf_counter() - start
        scores = {n: self.final_scores(self.series[n], raw[n]) for n in self.series}
        results_dir = out / "nab"
        for n, s in self.series.items():
            labels = self.sweeps[n].window >= 0
            corpus.write_result(corpus.result_path(results_dir, self.detector, n), s, scores[n], labels)
        report = score_corpus(self.sweeps, scores)
        records = sum(len(s) for s in self.series.values())
        summary = {"status": "completed", **info, **self.figures_of(report),
                   "files": len(self.series), "records": records, "complete": self.complete,
                   "detector": self.detector, "score": self.score,
                   "variant": "raw score" if self.score == "raw" else "likelihood",
                   "wall_seconds": wall, "records_per_second": records / wall,
                   "us_per_record": 1e6 * sum(seconds.values()) / records,
                   "skipped_rows": {n: s.skipped for n, s in self.series.items() if s.skipped},
                   "results_dir": str(results_dir / self.detector),
                   "outputs": f"summary.json, files.csv, nab/{self.detector}/ (NAB's layout), nab_*.png"}
        self.write_table(out / "files.csv", report, seconds)
        with atomic_write(out / "raw_scores.npz", "wb") as f:
            np.savez_compressed(f, **{n: raw[n] for n in self.series})
        pictures = self.draw(out, raw, scores, report["standard"].threshold)
        write_json(out / "summary.json", summary, indent=2, default=float)  # last: the run is complete
        self.log(logger, cfg, summary, pictures)
        self.print_result(summary, out, pictures)
        return summary

    def check_model(self, cfg) -> None:
        """Build the model and rule once here, so that a bad setting stops the run before the
        workers start."""
        from hydra.utils import instantiate

        encoder = encoder_for(np.array([0.0, 1.0]), self.settings)
        instantiate(self.rule_config(cfg)).check(instantiate(cfg.model, input_size=encoder.output_size))
        instantiate(cfg.optimizer)([torch.zeros(1, requires_grad=True)])

    def rule_config(self, cfg) -> dict:
        """The learning rule's config, with `hebbian` over it where the rule learns locally."""
        rule = OmegaConf.to_container(cfg.learning.rule, resolve=True)
        return {**rule, **self.hebbian} if rule.get("name") in ("local", "hybrid") else rule

    def detect_all(self, cfg) -> tuple[dict, dict]:
        """Raw scores and seconds of every file: the longest files first, in `workers` processes."""
        plain = lambda c: OmegaConf.to_container(c, resolve=True)  # noqa: E731
        shared = (self.settings, plain(cfg.model), self.rule_config(cfg), plain(cfg.optimizer),
                  cfg.learning.gradient_clip_val, cfg.seed)
        names = sorted(self.series, key=lambda n: -len(self.series[n]))
        jobs = [(self.series[n], *shared) for n in names]
        raw, seconds = {}, {}
        if self.workers == 1:
            done = map(_detect, jobs)
        else:
            context = multiprocessing.get_context("spawn")  # no torch or numba threads forked mid-use
            pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_setup,
                                       initargs=(cfg.torch_threads,))
            done = pool.map(_detect, jobs)
        try:
            for i, (name, (r, s)) in enumerate(zip(names, done), start=1):
                raw[name], seconds[name] = r, s
                print(f"[{i}/{len(names)}] {name}: {len(r)} records, {s:.1f} s", flush=True)
        finally:
            if self.workers > 1:
                pool.shutdown(cancel_futures=True)
        return raw, seconds

    def final_scores(self, series: corpus.Series, raw: np.ndarray) -> np.ndarray:
        """The reported score of every row from the raw scores of the rows the detector saw."""
        good = series.good
        r, v = raw[good], series.values[good]
        if self.score == "likelihood":
            period = probation_length(len(series))  # NAB's HTM detector: half to learn, half to fit
            s = anomaly_likelihood(r, v, period // 2, period - period // 2, **self.likelihood)
        else:
            s = r.copy()
        if self.spatial_tolerance is not None:
            s[spatial_anomaly(v, self.spatial_tolerance)] = 1.0
        scores = np.zeros(len(series))
        scores[good] = s
        return scores

    def figures_of(self, report) -> dict:
        """summary.json's scores: normalised per profile, thresholds, per group, detections."""
        out = {}
        for profile in PROFILES:
            result, key = report[profile.name], SUMMARY_KEYS[profile.name]
            out[key] = result.score
            out[f"threshold_{key[4:]}"] = result.threshold
        standard = report["standard"]
        totals = functools.reduce(operator.add, standard.files.values())
        out.update({"windows": totals.windows, "windows_detected": totals.detected, "false_positives": totals.fp})
        for group, value in standard.groups.items():
            out[f"nab_standard_{group}"] = value
        out["groups"] = {g: {p.name: report[p.name].groups[g] for p in PROFILES} for g in standard.groups}
        return out

    def write_table(self, path: Path, report, seconds: dict) -> None:
        """files.csv: per file, its size, windows, time and each profile's outcome."""
        with atomic_write(path) as f:
            out = csv.writer(f, lineterminator="\n")
            header = ["file", "records", "skipped", "windows", "seconds"]
            for p in PROFILES:
                header += [f"{p.name}_score", f"{p.name}_detected", f"{p.name}_fp"]
            out.writerow(header)
            for n, s in self.series.items():
                row = [n, len(s), len(s.skipped), self.sweeps[n].windows, f"{seconds[n]:.2f}"]
                for p in PROFILES:
                    o = report[p.name].files[n]
                    row += [f"{o.score:.4f}", o.detected, o.fp]
                out.writerow(row)

    def draw(self, out: Path, raw: dict, scores: dict, threshold: float) -> list[Path]:
        paths = []
        for n in self.plots:
            if n in self.series:
                s = self.series[n]
                name = Path(n).stem
                paths.append(plot_file(out / f"nab_{name}.png", n, s.values, raw[n], scores[n], self.sweeps[n],
                                       threshold))
        return paths

    @staticmethod
    def log(logger, cfg, summary: dict, pictures: list[Path]) -> None:
        """The summary's figures to the logger, the pictures to wandb (others take no images)."""
        if logger is None:
            return
        from lightning.pytorch.loggers import WandbLogger

        from predictive.harness.callbacks import log_images

        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        logger.log_metrics(numbers)
        log_images([logger], {f"nab/{p.stem}": p for p in pictures})
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next run of a multirun starts its own wandb run
        else:
            logger.save()

    def print_result(self, summary: dict, out: Path, pictures: list[Path]) -> None:
        scope = "" if self.complete else " (a subset: not comparable with NAB's scoreboard)"
        print(f"\nNAB{scope}: {summary['files']} files, {summary['records']} records, "
              f"{summary['wall_seconds']:.0f} s wall, {summary['records_per_second']:.0f} records/s")
        shown = {k: "n/a (no windows)" if summary[k] is None else f"{summary[k]:.2f}"
                 for k in ("nab_standard", "nab_reward_low_fp", "nab_reward_low_fn")}
        print(f"  standard {shown['nab_standard']}  reward_low_FP {shown['nab_reward_low_fp']}  "
              f"reward_low_FN {shown['nab_reward_low_fn']}")
        print(f"  results (NAB's layout): {summary['results_dir']}")
        print(f"  per file: {out / 'files.csv'}; pictures: {', '.join(p.name for p in pictures) or 'none'}")


def _worker_setup(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _detect(job) -> tuple[np.ndarray, float]:
    return detect(*job)
