"""Which clips make up a speech data set, their words, speakers and splits (no decoding here).

Splits are deterministic: they depend only on file names (or a data set's own split lists), never
on the order files are listed in or on a random seed. They are speaker-disjoint where the names
say who speaks (`<speaker>_nohash_<n>.wav`, `task.speaker_pattern`); a folder whose names do not
is split per file, and says so.
"""

import csv
import hashlib
import logging
import math
import re
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GSC_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE, UNKNOWN, NOISE_DIR = "_silence_", "_unknown_", "_background_noise_"
GSC_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
FSDD_URL = (
    "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/26eb9aaf76e81b692f806f9140c2d2777410d7a1.zip"
)


@dataclass(frozen=True)
class Clip:
    path: Path
    word: str  # what is said (folder name; in a `_unknown_` folder, the file-name prefix)
    speaker: str  # grouping key of the speaker-disjoint split
    split: str  # train | val | test
    start: int = 0  # a generated `_silence_` clip is a crop of a background-noise file:
    volume: float = 1.0  # its first sample (at the target rate) and its scale


def hash_split(key: str, val_percent: float, test_percent: float, salt: str = "") -> str:
    """The Speech Commands README's `which_set` rule: sha1 of the speaker id -> a percentage."""
    max_per_class = 2**27 - 1
    percent = (int(hashlib.sha1((salt + key).encode()).hexdigest(), 16) % (max_per_class + 1)) * (100.0 / max_per_class)
    if percent < val_percent:
        return "val"
    if percent < val_percent + test_percent:
        return "test"
    return "train"


def speaker_of(file_name: str) -> str:
    """`<speaker>_nohash_<n>.wav` -> speaker (the README's rule); a name without `_nohash_` is
    its own group, so such folders fall back to a file-hash split."""
    return re.sub(r"_nohash_.*$", "", file_name)


def _wavs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.wav") if p.is_file())  # also `x.wav.wav`


def speech_commands(root: Path, val_percent=10.0, test_percent=10.0) -> list[Clip]:
    """The v0.02 layout `<word>/<speaker>_nohash_<n>.wav`. validation_list.txt/testing_list.txt
    decide the split when both exist (`read_split_files`), else the hash rule. The shipped test
    set's `_unknown_` folder holds `<word>_<speaker>_nohash_<n>.wav.wav`: the word comes from the
    name. Without lists, a copy where under half the speakers hash to train gets the salted rule."""
    paths = [p for f in sorted(p for p in root.iterdir() if p.is_dir() and p.name != NOISE_DIR) for p in _wavs(f)]
    if not paths:
        raise FileNotFoundError(f"{root}: no `<word>/*.wav` files (task.dataset=speech_commands)")
    # A copy of one official split (e.g. the shipped test set) lies in one hash range, so the
    # README's rule would leave train (nearly) empty; the same rule on a salted key re-splits it.
    speakers = {speaker_of(p.name.split("_", 1)[1] if p.parent.name == UNKNOWN else p.name) for p in paths}
    in_train = sum(hash_split(k, val_percent, test_percent) == "train" for k in speakers)
    salt = "" if in_train >= len(speakers) / 2 else "resplit:"
    lists = {"val": root / "validation_list.txt", "test": root / "testing_list.txt"}
    listed = read_split_files(root, lists, paths) if all(p.is_file() for p in lists.values()) else None
    clips = []
    for path in paths:
        word, name = path.parent.name, path.name
        if word == UNKNOWN:
            word, name = name.split("_", 1)
        speaker = speaker_of(name)
        split = listed[path] if listed else hash_split(speaker, val_percent, test_percent, salt)
        clips.append(Clip(path, word, speaker, split))
    return clips


def read_split_files(root: Path, split_files, paths: list[Path]) -> dict[Path, str]:
    """{file: split} from a data set's own split lists: `{split: list file}` (one path under `root`
    per line; a file in no list is train unless a train list is given, then it is left out), or
    one CSV file with `file` and `split` columns (a file in no row is left out). Files are read
    line by line, so names may hold spaces (`zoom in/0a2b_nohash_0.wav`); list files are found
    under `root` unless absolute. An entry that names no file of the data set is an error, every
    one of them named."""
    known = {p.relative_to(root).as_posix(): p for p in paths}
    entries = list(_split_entries(root, split_files))
    unknown = [f"{where}: {name}" for where, name, _ in entries if name not in known]
    if unknown:
        shown = "\n  ".join(unknown[:20]) + (f"\n  ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise ValueError(f"task.split_files: {len(unknown)} entries name no file under {root}:\n  {shown}")
    splits = {}
    for where, name, split in entries:
        if splits.setdefault(known[name], split) != split:
            raise ValueError(f"{where}: {name} is listed as {splits[known[name]]} and as {split}")
    if isinstance(split_files, Mapping) and "train" not in split_files:
        splits = {p: splits.get(p, "train") for p in paths}
    if len(splits) < len(paths):
        log.info("%d of %d files are in no split list: left out", len(paths) - len(splits), len(paths))
    return splits


def _split_entries(root: Path, split_files):
    """(where: `<file>:<line>`, name, split) of every entry of the split lists or CSV."""
    if isinstance(split_files, Mapping):
        for split, path in split_files.items():
            path = _under(root, path)
            for line, name in enumerate(path.read_text().splitlines(), 1):
                if name.strip():
                    yield f"{path}:{line}", name.strip(), split
        return
    path = _under(root, split_files)
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        if not {"file", "split"} <= set(rows.fieldnames or ()):
            raise ValueError(f"{path}:1: expected the columns file and split, got {rows.fieldnames}")
        for line, row in enumerate(rows, 2):
            if row["split"].strip() not in SPLITS:
                raise ValueError(f"{path}:{line}: split must be one of {' | '.join(SPLITS)}, got {row['split']!r}")
            yield f"{path}:{line}", row["file"].strip(), row["split"].strip()


def _under(root: Path, path) -> Path:
    path = Path(path) if Path(path).is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"task.split_files: {path} not found")
    return path


def gsc_label(word: str, vocabulary: str) -> str:
    """12-class setup: ten command words, `_silence_`, and every other word as `_unknown_`."""
    if vocabulary == "full" or word in GSC_WORDS or word == SILENCE:
        return word
    return UNKNOWN


def balance_gsc(
    clips: list[Clip],
    root: Path,
    sample_rate: int,
    clip_samples: int,
    unknown_percent: float | None,
    silence_percent: float,
) -> list[Clip]:
    """As TensorFlow's speech_commands input_data: per split, keep `_unknown_` words at most
    `unknown_percent`% of the command-word count (chosen by file hash), and, when there are no
    `_silence_` files but a `_background_noise_` folder, add `silence_percent`% silence clips
    cut from the noise files at volumes in [0, 1)."""
    from .audio import read_wav  # only needed when silence is generated

    out = []
    noise = _wavs(root / NOISE_DIR) if (root / NOISE_DIR).is_dir() else []
    if any(c.word == SILENCE for c in clips):
        noise = []
    lengths = []
    for p in noise:
        samples, rate = read_wav(p)
        lengths.append(len(samples) * sample_rate // rate)
    for split in SPLITS:
        part = [c for c in clips if c.split == split]
        known = [c for c in part if c.word in GSC_WORDS or c.word == SILENCE]
        unknown = [c for c in part if not (c.word in GSC_WORDS or c.word == SILENCE)]
        n_cmd = sum(c.word in GSC_WORDS for c in part)
        if unknown_percent is not None:
            unknown.sort(key=lambda c: hashlib.sha1(str(c.path.name).encode()).hexdigest())
            unknown = unknown[: math.ceil(n_cmd * unknown_percent / 100)]
        out += sorted(known + unknown, key=lambda c: str(c.path))
        if noise:
            for i in range(math.ceil(n_cmd * silence_percent / 100)):
                h = int(hashlib.sha1(f"{split}/{i}".encode()).hexdigest(), 16)
                j = h % len(noise)
                start = (h >> 8) % max(1, lengths[j] - clip_samples)
                out.append(Clip(noise[j], SILENCE, f"noise{j}", split, start, (h >> 40) % 1000 / 1000))
    return out


def fsdd(root: Path, split="official", val_takes=5, test_speaker="theo", val_speaker="jackson") -> list[Clip]:
    """`recordings/<digit>_<speaker>_<take>.wav`. split=official: takes 0-4 test (the data set's
    own split), the next `val_takes` takes val; split=speaker: whole speakers held out, one for
    test and another for validation (rotate `test_speaker` for a leave-one-speaker-out estimate)."""
    if split not in ("official", "speaker"):
        raise ValueError(f"task.split must be 'official' or 'speaker' for fsdd, got {split!r}")
    if split == "speaker" and test_speaker == val_speaker:
        raise ValueError(f"task.test_speaker and task.val_speaker must differ, both are {test_speaker!r}")
    clips = []
    for path in _wavs(root / "recordings"):
        parts = path.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
            raise ValueError(f"{path}: expected an FSDD name `<digit>_<speaker>_<take>.wav`")
        digit, speaker, take = parts[0], parts[1], int(parts[2])
        if split == "official":
            part = "test" if take < 5 else "val" if take < 5 + val_takes else "train"
        else:
            part = "test" if speaker == test_speaker else "val" if speaker == val_speaker else "train"
        clips.append(Clip(path, digit, speaker, part))
    if not clips:
        raise FileNotFoundError(f"{root / 'recordings'}: no FSDD wav files (task.dataset=fsdd)")
    speakers = sorted({c.speaker for c in clips})
    for setting, name in (("test_speaker", test_speaker), ("val_speaker", val_speaker)):
        if split == "speaker" and name not in speakers:
            raise ValueError(f"task.{setting}={name}: no such speaker in {root / 'recordings'} ({', '.join(speakers)})")
    return clips


def folder(root: Path, val_percent=10.0, test_percent=10.0, speaker_pattern=None, split_files=None):
    """Any `<class>/<clip>.wav` tree. Returns the clips and how they were split:
    "lists": by the data set's own lists (`split_files`, see `read_split_files`);
    "speaker": speaker-disjoint by the hash rule, the speaker being the first group of
        `speaker_pattern` in each file name, or `<speaker>` of `<speaker>_nohash_<n>.wav`;
    "per_file": by each file name's hash when neither applies (logged): one speaker's takes
        may land in train and in test."""
    paths = [p for d in sorted(p for p in root.iterdir() if p.is_dir()) for p in _wavs(d)]
    if not paths:
        raise FileNotFoundError(f"{root}: no `<class>/*.wav` files (task.dataset=folder)")
    if split_files is not None:
        splits = read_split_files(root, split_files, paths)
        return [Clip(p, p.parent.name, p.name, splits[p]) for p in paths if p in splits], "lists"
    loose = []  # files whose names do not say who speaks
    if speaker_pattern is not None:
        speakers = {p: _pattern_speaker(p, speaker_pattern) for p in paths}
    else:
        speakers = {p: speaker_of(p.name) for p in paths}
        loose = [p for p in paths if "_nohash_" not in p.name]
    if loose:
        log.warning("%d of %d files are not named <speaker>_nohash_<n>.wav (e.g. %s): they are split per file, NOT "
                    "speaker-disjoint; set task.speaker_pattern or task.split_files", len(loose), len(paths),
                    loose[0].relative_to(root))
    kind = "per_file" if loose else "speaker"
    return [Clip(p, p.parent.name, speakers[p], hash_split(speakers[p], val_percent, test_percent))
            for p in paths], kind


def _pattern_speaker(path: Path, pattern: str) -> str:
    match = re.search(pattern, path.name)
    if match is None or not match.group(1):
        raise ValueError(f"{path}: task.speaker_pattern={pattern} finds no speaker in its name")
    return match.group(1)


def find_root(dataset: str, data_dir, root=None, download=False) -> Path:
    """The data set's folder: task.root if set, else the usual names under task.data_dir.
    Downloads the public original only when task.download=true and nothing is there."""
    if root is not None:
        candidates = [Path(root)]
    elif dataset == "speech_commands":
        candidates = [Path(data_dir) / "speech_commands_v0.02", Path(data_dir) / "speech_commands_v0.02_test"]
    elif dataset == "fsdd":
        candidates = [Path(data_dir) / "fsdd"]
    else:
        raise ValueError(f"task.root must name the folder for task.dataset={dataset}")
    for c in candidates:
        if c.is_dir():
            return c
    if download and dataset in ("speech_commands", "fsdd"):
        fetch(dataset, candidates[0])
        return candidates[0]
    raise FileNotFoundError(
        f"task.dataset={dataset}: no folder at {' or '.join(map(str, candidates))}. Set "
        "paths.data_dir (or PREDICTIVE_DATA_DIR) or task.root, or task.download=true to fetch it."
    )


def fetch(dataset: str, dest: Path) -> None:
    """Download and unpack the public original into `dest` (Speech Commands v0.02: 2.3 GB)."""
    url = GSC_URL if dataset == "speech_commands" else FSDD_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / url.rsplit("/", 1)[1]
        log.info("downloading %s to %s", url, archive)
        try:
            urllib.request.urlretrieve(url, archive)
        except OSError as e:  # URLError, HTTPError and timeouts are OSErrors
            raise OSError(
                f"task.download=true: could not fetch {url} ({e}); download it by hand and unpack it "
                f"into {dest}, or point task.root at a copy"
            ) from e
        unpacked = Path(tmp) / "unpacked"
        if dataset == "speech_commands":
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
            unpacked.rename(dest)
        else:
            with zipfile.ZipFile(archive) as z:
                z.extractall(unpacked)
            (repo,) = unpacked.iterdir()  # free-spoken-digit-dataset-<commit>/
            dest.mkdir()
            shutil.move(str(repo / "recordings"), dest / "recordings")
    log.info("%s ready at %s", dataset, dest)
