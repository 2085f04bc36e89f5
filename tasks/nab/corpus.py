"""The NAB corpus on disk: data files `data/<group>/<name>.csv` (`timestamp,value`), label
windows `labels/combined_windows.json`, and results in NAB's layout
`<results>/<detector>/<group>/<detector>_<name>.csv`.

Every data file is read and checked before any detection starts: a missing or unparsable
timestamp, a value that is not a finite number, or a time that goes back (by more than a clock
change) stops with an error naming the file and the line (or, with `skip_bad`, the row is left out of detection
and listed). A corpus that lacks files of the label list is reported, never scored as if
complete.
"""

import csv
import json
import math
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from predictive.harness.files import atomic_write
from tasks.nab.scoring import FileSweep, file_sweep, window_rows

HEADER = ["timestamp", "value", "anomaly_score", "label"]


@dataclass
class Series:
    """One data file. Rows that were skipped (bad input under `skip_bad`) are kept in `stamps`
    (the output has one row per data row) but masked out of `good`."""

    name: str  # "<group>/<file>.csv", as in the label file
    stamps: list[str]  # the timestamp strings, exactly as in the file
    raw_values: list[str]  # the value strings, exactly as in the file
    times: np.ndarray  # datetime64[s]; NaT where skipped
    values: np.ndarray  # float64; NaN where skipped
    good: np.ndarray  # bool: the rows the detector sees
    skipped: list[str] = field(default_factory=list)  # "line N: why", one per skipped row

    def __len__(self) -> int:
        return len(self.stamps)


def parse_time(text: str) -> datetime:
    """NAB's timestamps: 'YYYY-MM-DD HH:MM:SS' (ISO 8601; fractions of a second allowed)."""
    text = text.strip()
    if not text:
        raise ValueError("missing timestamp")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"unparsable timestamp {text!r}") from None


def parse_value(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"unparsable value {text.strip()!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"value is {text.strip()}")
    return value


def read_series(path: Path, name: str, skip_bad: bool = False, clock_change_minutes: float = 60) -> Series:
    """Read and check one data file; `name` is its path under data/. A time may repeat or go
    back by up to `clock_change_minutes` (a clock change: NAB's own files have them, e.g.
    03:00 twelve times on a daylight-saving night); further back is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"NAB data file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0][:2]] != ["timestamp", "value"]:
        raise ValueError(f"{path}:1: expected the header 'timestamp,value', got {rows[0] if rows else 'an empty file'}")
    stamps, raw_values, times, values, skipped = [], [], [], [], []
    last = None  # the latest time so far
    for line, row in enumerate(rows[1:], start=2):
        stamp, text = (row + ["", ""])[:2]
        try:
            when, value = parse_time(stamp), parse_value(text)
            if last is not None and (last - when).total_seconds() > 60 * clock_change_minutes:
                raise ValueError(f"time {stamp.strip()} goes back from {last} (by more than a clock change, "
                                 f"task.clock_change_minutes={clock_change_minutes})")
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{path}:{line}: {e} (task.skip_bad=true skips such rows)") from e
            skipped.append(f"line {line}: {e}")
            when, value = None, math.nan
        else:
            last = when if last is None else max(last, when)
        stamps.append(stamp)
        raw_values.append(text)
        times.append(np.datetime64(when, "s") if when is not None else np.datetime64("NaT"))
        values.append(value)
    if len(stamps) == len(skipped):
        raise ValueError(f"{path}: no usable data rows")
    values = np.asarray(values, dtype=np.float64)
    return Series(name, stamps, raw_values, np.asarray(times, dtype="datetime64[s]"), values, ~np.isnan(values),
                  skipped)


def load_windows(path: Path) -> dict[str, list[tuple[str, str]]]:
    """The label file: {"<group>/<file>.csv": [(start, end), ...]}."""
    if not path.is_file():
        raise FileNotFoundError(f"NAB label file not found: {path}")
    return {name: [tuple(w) for w in windows] for name, windows in json.loads(path.read_text()).items()}


def corpus_files(data_dir: Path, windows: dict, files: list[str] | None = None) -> list[str]:
    """The data files to run: all of the label list, or the chosen subset of it. Any listed
    file that is missing under `data_dir` is an error that names them."""
    names = sorted(windows)
    if files is not None:
        unknown = sorted(set(files) - set(names))
        if unknown:
            raise ValueError(f"task.files: not in the label file: {', '.join(unknown)}")
        names = sorted(set(files))
    missing = [n for n in names if not (data_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the NAB corpus under {data_dir} is incomplete: {len(missing)} of {len(names)} files are missing "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); it is not scored as if complete"
        )
    return names


def sweep_of(series: Series, windows: list[tuple[str, str]]) -> FileSweep:
    """The scorer's view of a data file (its windows located by their exact timestamps)."""
    return file_sweep(series.name, len(series), window_rows(series.name, series.times, windows))


def result_path(root: Path, detector: str, name: str) -> Path:
    """NAB's layout: <root>/<detector>/<group>/<detector>_<file>.csv."""
    group, file = name.split("/")
    return root / detector / group / f"{detector}_{file}"


def write_result(path: Path, series: Series, scores: np.ndarray, labels: np.ndarray) -> None:
    """One results file: the data file's timestamps and values as written there, the scores
    and NAB's label column (1 inside a window)."""
    if len(scores) != len(series) or not np.all((scores >= 0) & (scores <= 1)):
        raise ValueError(f"{series.name}: anomaly scores must be {len(series)} values in [0, 1]")
    with atomic_write(path) as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(HEADER)
        for stamp, value, score, label in zip(series.stamps, series.raw_values, scores, labels):
            out.writerow([stamp, value, repr(float(score)), int(label)])


def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, anomaly scores) of one results file in NAB's layout."""
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0] if rows else []
    if "timestamp" not in header or "anomaly_score" not in header:
        raise ValueError(f"{path}:1: expected columns 'timestamp' and 'anomaly_score', got {header}")
    t, s = header.index("timestamp"), header.index("anomaly_score")
    times = np.array([r[t].strip().replace(" ", "T") for r in rows[1:]], dtype="datetime64[s]")
    scores = np.array([float(r[s]) for r in rows[1:]])
    if not np.isfinite(scores).all():
        raise ValueError(f"{path}: anomaly scores contain NaN or inf")
    return times, scores


def read_results(root: Path, detector: str, windows: dict) -> tuple[dict[str, FileSweep], dict[str, np.ndarray]]:
    """Sweeps and scores of every file of the label list from a results directory in NAB's
    layout (the timestamps are the results files' own); a missing file is an error."""
    names = sorted(windows)
    missing = [n for n in names if not result_path(root, detector, n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root / detector}: {len(missing)} of {len(names)} results files are missing "
                                f"({', '.join(missing[:5])}); an incomplete corpus is not scored")
    sweeps, scores = {}, {}
    for name in names:
        times, scores[name] = read_scores(result_path(root, detector, name))
        sweeps[name] = file_sweep(name, len(times), window_rows(name, times, windows[name]))
    return sweeps, scores


def truncate(series: Series, records: int) -> Series:
    """The first `records` rows of a file (quick runs and tests)."""
    cut = slice(0, records)
    kept = set(range(records))
    skipped = [s for s in series.skipped if int(s.split()[1].rstrip(":")) - 2 in kept]
    return Series(series.name, series.stamps[cut], series.raw_values[cut], series.times[cut], series.values[cut],
                  series.good[cut], skipped)


def windows_within(windows: list[tuple[str, str]], series: Series) -> list[tuple[str, str]]:
    """The windows that end within the file's rows (all of them, unless it was truncated)."""
    last = series.times[series.good].max()
    return [w for w in windows if np.datetime64(w[1].replace(" ", "T"), "s") <= last]


NAB_URL = "https://github.com/numenta/NAB/archive/refs/heads/master.zip"


def fetch(root: Path, url: str = NAB_URL) -> None:
    """Download NAB's repository archive and unpack its data/ and labels/ into `root`, unless
    the label file is there already."""
    if (root / "labels" / "combined_windows.json").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "nab.zip"
        print(f"downloading {url} to {archive}", flush=True)
        try:
            urllib.request.urlretrieve(url, archive)
        except OSError as e:  # URLError, HTTPError and timeouts are OSErrors
            raise OSError(f"task.download=true: could not fetch {url} ({e}); download NAB by hand (git clone "
                          f"https://github.com/numenta/NAB) and copy its data/ and labels/ into {root}") from e
        with zipfile.ZipFile(archive) as z:
            z.extractall(Path(tmp) / "unpacked")
        (repo,) = (Path(tmp) / "unpacked").iterdir()  # NAB-master/
        for part in ("data", "labels"):
            if not (repo / part).is_dir():
                raise OSError(f"task.download=true: {url} holds no {part}/ folder; is it NAB's repository?")
            if not (root / part).exists():
                shutil.move(str(repo / part), root / part)
