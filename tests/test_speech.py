"""Speech task: audio loading, log-mel features, data sets and splits, augmentation, noise sweep."""

import logging
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, needs_data

from tasks.speech import datasets as ds
from tasks.speech.audio import AudioError, fix_length, load_clip, read_wav
from tasks.speech.augment import Augment
from tasks.speech.data import ClipSet, NoiseSweep, decode
from tasks.speech.features import LogMel, frame_energy, mel_filterbank

GSC = DATA / "speech_commands_v0.02_test"
FSDD = DATA / "fsdd"
needs_gsc = needs_data("speech_commands_v0.02_test")
needs_fsdd = needs_data("fsdd")


def write_wav(path, x, rate):
    """float samples in [-1, 1], shape (n,) or (n, channels) -> 16-bit PCM file."""
    x = np.asarray(x, dtype=np.float64)
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1 if x.ndim == 1 else x.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return path


def tone(freq, seconds, rate, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


# --- audio loading -------------------------------------------------------------------------


def two_tones(root, speakers=40):
    """A folder data set: classes "low" (300 Hz) and "high" (2 kHz), 0.3 s tones at 8 kHz."""
    for cls, freq in (("low", 300), ("high", 2000)):
        for n in range(speakers):
            write_wav(root / cls / f"spk{n}_nohash_0.wav", tone(freq, 0.3, 8000), 8000)


def test_stereo_is_mixed_down_and_8k_is_resampled_to_16k(tmp_path):
    left, right = tone(440, 0.5, 8000), tone(440, 0.5, 8000, amp=0.1)
    path = write_wav(tmp_path / "s.wav", np.stack([left, right], 1), 8000)
    x, rate = read_wav(path)
    assert rate == 8000 and x.shape == (4000,) and x.dtype == np.float32
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-4)
    y = load_clip(path, 16000, 16000)
    assert y.shape == (16000,)
    # 0.5 s of a 440 Hz tone centred in a 1 s clip: the spectral peak stays at 440 Hz.
    spectrum = np.abs(np.fft.rfft(y[4000:12000]))
    assert abs(np.argmax(spectrum) * 16000 / 8000 - 440) <= 2
    assert np.all(y[:3900] == 0) and np.all(y[12100:] == 0)


def test_fix_length_pads_and_crops_around_the_centre():
    x = np.arange(1, 5, dtype=np.float32)
    np.testing.assert_array_equal(fix_length(x, 8), [0, 0, 1, 2, 3, 4, 0, 0])
    np.testing.assert_array_equal(fix_length(x, 2), [2, 3])


def test_bad_files_raise_errors_naming_the_file(tmp_path):
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    truncated = write_wav(tmp_path / "cut.wav", tone(300, 0.2, 16000), 16000)
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    eight_bit = tmp_path / "u8.wav"
    with wave.open(str(eight_bit), "wb") as f:
        f.setnchannels(1), f.setsampwidth(1), f.setframerate(8000), f.writeframes(bytes(100))
    for path, why in [
        (empty, "no samples"),
        (truncated, "truncated"),
        (text, "not a readable wav"),
        (eight_bit, "8-bit"),
    ]:
        with pytest.raises(AudioError, match=why) as e:
            read_wav(path)
        assert str(path) in str(e.value)


def test_every_bad_file_is_named_before_training_or_left_out_and_listed(tmp_path, monkeypatch):
    """A folder with bad files of every kind: the run stops before training naming each one, not
    only the first; with task.skip_bad_files=true they are left out and listed in bad_files.txt."""
    from test_harness import config

    import train
    from tasks.speech import data

    root = tmp_path / "d"
    two_tones(root)  # 80 good clips at 8 kHz
    bad = {
        root / "low" / "text_nohash_0.wav": "not a readable wav file (file does not start with RIFF id)",
        root / "low" / "empty_nohash_0.wav": "the file holds no samples",
        root / "high" / "cut_nohash_0.wav": "truncated: header says 2400 frames, file holds 1900",
        root / "high" / "rate_nohash_0.wav": "sample rate 44100 Hz, the data set's files are 8000 Hz",
        root / "high" / "u8_nohash_0.wav": "8-bit samples; only 16-bit PCM is supported",
        root / "low" / "nan_nohash_0.wav": "non-finite samples (NaN or inf)",
    }
    (root / "low" / "text_nohash_0.wav").write_text("not audio")
    write_wav(root / "low" / "empty_nohash_0.wav", np.zeros(0), 8000)
    cut = write_wav(root / "high" / "cut_nohash_0.wav", tone(2000, 0.3, 8000), 8000)
    cut.write_bytes(cut.read_bytes()[:-1000])
    write_wav(root / "high" / "rate_nohash_0.wav", tone(2000, 0.3, 44100), 44100)
    with wave.open(str(root / "high" / "u8_nohash_0.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(1), f.setframerate(8000), f.writeframes(bytes(100))
    write_wav(root / "low" / "nan_nohash_0.wav", tone(300, 0.3, 8000), 8000)
    read = data.read_wav  # 16-bit PCM holds no NaN: a decoder that returned one
    monkeypatch.setattr(data, "read_wav", lambda p: (np.full(10, np.nan, np.float32), 8000) if "nan_" in str(p)
                        else read(p))
    run = ["task=speech", "task.dataset=folder", f"task.root={root}", "task.sample_rate=8000", "task.n_fft=256",
           "task.clip_seconds=0.5", "task.n_mels=20", "logger=none"]
    with pytest.raises(AudioError) as e:
        train.prepare(config(tmp_path / "run", *run, base=()))
    lines = str(e.value).splitlines()
    assert lines[0].startswith("6 of 86 audio files cannot be used (task.skip_bad_files=true leaves them out")
    assert sorted(lines[1:]) == sorted(f"  {path}: {why}" for path, why in bad.items())
    monkeypatch.setattr(data, "MAX_LISTED", 4)  # a folder of many bad files: the first few, and the count
    with pytest.raises(AudioError) as e:
        train.prepare(config(tmp_path / "run", *run, base=()))
    assert len(str(e.value).splitlines()) == 6 and str(e.value).endswith("\n  ... and 2 more")

    prepared = train.prepare(config(tmp_path / "run", *run, "task.skip_bad_files=true", base=()))
    listed = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert sorted(listed) == sorted(f"{path}: {why}" for path, why in bad.items())
    sets = prepared.datamodule.sets
    assert sum(len(s) for s in sets.values()) == 80  # the good clips, all of them
# --- features --------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_mel_filterbank_matches_librosa(scale):
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(16000, 512, 40, 20.0, 7600.0, scale).numpy()
    ref = librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, fmin=20.0, fmax=7600.0, htk=scale == "htk")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)  # float32 rounding of values <= 0.02


@needs_gsc
def test_log_mel_of_a_real_clip_matches_librosa_power_spectrogram():
    librosa = pytest.importorskip("librosa")
    y = load_clip(next((GSC / "yes").glob("*.wav")), 16000, 16000)
    ours = LogMel(normalize="none")(torch.from_numpy(y)[None])[0].numpy()
    power = (
        np.abs(
            librosa.stft(
                y.astype(np.float64),
                n_fft=512,
                hop_length=160,
                win_length=400,
                window="hann",
                center=True,
                pad_mode="constant",
            )
        )
        ** 2
    )
    ref = np.log(librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, fmin=20.0) @ power + 1e-6).T
    assert ours.shape == ref.shape == (101, 40)
    # float32 STFT vs float64: log-mel agrees to 1e-3 nats everywhere (measured ~1e-5).
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)


def test_log_mel_is_batched_normalised_and_optionally_has_deltas():
    rng = np.random.default_rng(0)
    audio = torch.from_numpy(rng.uniform(-0.5, 0.5, (3, 8000)).astype(np.float32))
    audio[1] *= 0.01  # a quiet clip gets frames on the same scale as a loud one
    m = LogMel(n_mels=32)
    x = m(audio)
    assert x.shape == (3, m.num_frames(8000), 32) == (3, 51, 32)
    torch.testing.assert_close(x[1], m(audio[1:2])[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(x.mean((1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((1, 2)), torch.ones(3), atol=1e-3, rtol=0)
    d = LogMel(n_mels=32, deltas=True)(audio)
    assert d.shape == (3, 51, 64)
    torch.testing.assert_close(d[:, 1, 32:], (x[:, 2] - x[:, 0]) / 2)
    spliced = LogMel(n_mels=32, deltas=True, context_frames=2)
    s = spliced(audio)
    assert s.shape == (3, 51, 5 * 64) == (3, 51, spliced.output_size)
    for i in range(5):  # frames t-2 .. t+2 side by side, zeros beyond the clip
        block = s[:, :, i * 64 : (i + 1) * 64]
        shifted = torch.nn.functional.pad(d, (0, 0, 2, 2))[:, i : i + 51]
        torch.testing.assert_close(block, shifted)
    torch.testing.assert_close(spliced.features(spliced.log_mel(audio)), s)  # forward, in its two steps
    # A frame's energy: the log of its summed mel power (each bin floored as in the features).
    mel_power = m.filters @ m.power(audio) + m.log_floor
    torch.testing.assert_close(frame_energy(m.log_mel(audio)), mel_power.sum(1).log())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="task.context_frames must be an integer >= 0"):
            LogMel(context_frames=bad)


def test_voiced_span_finds_the_loud_frames_and_widens_them():
    from tasks.speech.features import voiced_span

    energy = torch.full((3, 40), -2.0)
    energy[0, 10:21] = 1.0
    energy[1, 3] = 1.0
    energy[1, 30] = 0.5  # louder than 30% of the range: inside
    energy[1, 35] = -1.5  # quieter: outside
    energy[2] = 0.0  # the same energy throughout: the whole clip
    span = voiced_span(energy, threshold=0.3, margin=2)
    assert span.tolist() == [[8, 23], [1, 33], [0, 40]]
    assert voiced_span(energy[:1], threshold=0.3, margin=20).tolist() == [[0, 40]]


def test_voiced_span_within_a_range_of_the_peak_stays_put_when_noise_raises_the_floor():
    from tasks.speech.features import voiced_span

    clean = torch.full((1, 40), -10.0)  # log energies: silence,
    clean[0, 6:8] = -4.0  # a faint tail, 17 dB under the word,
    clean[0, 8:10] = -2.0  # an onset 8.7 dB under it,
    clean[0, 10:21] = 0.0  # the word
    noisy = clean.clamp(min=-5.0) + 0.02  # noise 22 dB under the word fills the silence
    fraction = [voiced_span(e, threshold=0.5).tolist() for e in (clean, noisy)]
    assert fraction == [[[6, 21]], [[8, 21]]]  # the fraction of the range alone moves with the floor
    ranged = [voiced_span(e, threshold=0.5, range_db=10.0).tolist() for e in (clean, noisy)]
    assert ranged == [[[8, 21]], [[8, 21]]]  # within 10 dB of the peak: the same frames
    raised = noisy.clamp(min=-1.0)  # noise within 10 dB of the word: the fraction keeps the loud half
    assert voiced_span(raised, threshold=0.5, range_db=10.0).tolist() == [[10, 21]]


def test_head_pools_segments_of_the_span_whatever_its_onset():
    """A word shifted in time, and pooled over its span, gives the same logits."""
    from tasks.speech.head import SegmentPoolHead, segment_means

    torch.manual_seed(0)
    word = torch.randn(1, 13, 5)
    early, late = torch.zeros(2, 1, 40, 5)
    early[:, 2:15], late[:, 20:33] = word, word
    head = SegmentPoolHead(5, 3, segments=4)
    spans = torch.tensor([[2, 15]]), torch.tensor([[20, 33]])
    torch.testing.assert_close(head(early, spans[0]), head(late, spans[1]))
    assert not torch.allclose(head(early), head(late))  # pooled over the whole clip: not the same
    # the segments: frames 2 + 13 i // 4 .. 2 + 13 (i + 1) // 4, each at least one frame
    expected = torch.cat([early[:, a:b].mean(1) for a, b in ((2, 5), (5, 8), (8, 11), (11, 15))], 1)
    torch.testing.assert_close(segment_means(early, spans[0], 4), expected)
    short = segment_means(early, torch.tensor([[39, 40]]), 4)  # one frame for four segments
    torch.testing.assert_close(short, early[:, 39].repeat(1, 4))


# --- data sets and splits --------------------------------------------------------------------


def fake_gsc(root, speakers=12):
    """A v0.02-like tree: 3 command words + 1 other word, `_silence_`, 2 takes per speaker."""
    for s in range(speakers):
        spk = f"{s:08x}"
        for word in ("yes", "no", "go", "bed"):
            for n in range(2):
                write_wav(root / word / f"{spk}_nohash_{n}.wav", tone(200 + 50 * n, 0.1, 16000), 16000)
    for n in range(3):
        write_wav(root / "_silence_" / f"{n}.wav", np.zeros(1600), 16000)
    return root


def test_speech_commands_splits_by_speaker_and_uses_the_lists_when_present(tmp_path):
    root = fake_gsc(tmp_path / "gsc")
    clips = ds.speech_commands(root)
    assert len(clips) == 12 * 4 * 2 + 3
    by_speaker = {}
    for c in clips:
        by_speaker.setdefault(c.speaker, set()).add(c.split)
    assert all(len(s) == 1 for s in by_speaker.values())  # speaker-disjoint
    assert clips == ds.speech_commands(root)  # deterministic
    (root / "validation_list.txt").write_text("yes/00000000_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/00000001_nohash_1.wav\n")
    listed = ds.speech_commands(root)
    assert [c.path.name for c in listed if c.split == "val"] == ["00000000_nohash_0.wav"]
    assert [(c.word, c.path.name) for c in listed if c.split == "test"] == [("no", "00000001_nohash_1.wav")]
    # The lists are read by line: a word folder whose name holds a space is listed as it is.
    write_wav(root / "zoom in" / "00000002_nohash_0.wav", tone(300, 0.1, 16000), 16000)
    (root / "testing_list.txt").write_text("no/00000001_nohash_1.wav\nzoom in/00000002_nohash_0.wav\n")
    assert {c.path.name for c in ds.speech_commands(root) if c.split == "test" and c.word == "zoom in"} == \
        {"00000002_nohash_0.wav"}
    (root / "testing_list.txt").write_text("no/00000001_nohash_1.wav\nzoom/00000002_nohash_0.wav\n")
    with pytest.raises(ValueError, match=r"1 entries name no file under .*\n  .*testing_list.txt:2: zoom/0000"):
        ds.speech_commands(root)


def speakers_in_splits(clips) -> dict:
    splits = {}
    for c in clips:
        splits.setdefault(c.speaker, set()).add(c.split)
    return splits


def test_a_folder_splits_by_speaker_only_where_the_names_say_who_speaks(tmp_path, caplog):
    """spk07_take3.wav names: split per file unless task.speaker_pattern says where the speaker is;
    summary.json says which."""
    from tasks.speech.task import SpeechTask

    root = tmp_path / "f"
    for cls in ("on", "off"):
        for speaker in range(12):
            for take in range(4):
                write_wav(root / cls / f"spk{speaker:02d}_take{take}.wav", tone(100, 0.05, 8000), 8000)
    with caplog.at_level(logging.WARNING):
        clips, split = ds.folder(root)
    assert split == "per_file" and "96 of 96 files are not named <speaker>_nohash_<n>.wav" in caplog.text
    assert "NOT speaker-disjoint" in caplog.text
    by_speaker = {}
    for c in clips:
        by_speaker.setdefault(c.path.name.split("_")[0], set()).add(c.split)
    assert any(len(s) > 1 for s in by_speaker.values())  # one speaker's takes in several splits: the leak
    clips, split = ds.folder(root, speaker_pattern=r"^(spk\d+)_")
    assert split == "speaker" and {c.speaker for c in clips} == {f"spk{i:02d}" for i in range(12)}
    assert all(len(s) == 1 for s in speakers_in_splits(clips).values())
    with pytest.raises(ValueError, match=re.escape(r"spk00_take0.wav: task.speaker_pattern=^(x\d)_ finds no speaker")):
        ds.folder(root, speaker_pattern=r"^(x\d)_")
    task = SpeechTask(dataset="folder", root=root, speaker_pattern=r"^(spk\d+)_", sample_rate=8000, n_fft=256)
    assert task.summary()["split"] == "speaker"
    assert SpeechTask(dataset="folder", root=root, sample_rate=8000, n_fft=256).summary()["split"] == "per_file"


def test_a_folder_split_by_its_own_lists_or_csv_names_every_entry_that_matches_no_file(tmp_path):
    root = tmp_path / "f"
    for cls in ("zoom in", "zoom out"):
        for n in range(5):
            write_wav(root / cls / f"clip {n}.wav", tone(100, 0.05, 8000), 8000)
    (root / "val.txt").write_text("zoom in/clip 0.wav\nzoom out/clip 0.wav\n\n")
    (root / "test.txt").write_text("zoom in/clip 1.wav\r\nzoom out/clip 1.wav\r\n")
    clips, split = ds.folder(root, split_files={"val": "val.txt", "test": "test.txt"})
    assert split == "lists" and len(clips) == 10
    assert sorted((c.word, c.path.name) for c in clips if c.split == "test") == [
        ("zoom in", "clip 1.wav"), ("zoom out", "clip 1.wav")]
    assert sum(c.split == "train" for c in clips) == 6  # in no list: train
    (root / "splits.csv").write_text('file,split\n"zoom in/clip 2.wav",test\nzoom out/clip 2.wav,val\n'
                                     "zoom out/clip 3.wav,train\n")
    clips, _ = ds.folder(root, split_files="splits.csv")
    assert [(c.path.name, c.split) for c in clips] == [("clip 2.wav", "test"), ("clip 2.wav", "val"),
                                                        ("clip 3.wav", "train")]  # in no row: left out
    (root / "test.txt").write_text("zoom in/clip 1.wav\nzoom_in/clip 2.wav\nzoom out/clip 9.wav\n")
    with pytest.raises(ValueError) as e:
        ds.folder(root, split_files={"val": "val.txt", "test": "test.txt"})
    assert str(e.value).splitlines() == [f"task.split_files: 2 entries name no file under {root}:",
                                         f"  {root / 'test.txt'}:2: zoom_in/clip 2.wav",
                                         f"  {root / 'test.txt'}:3: zoom out/clip 9.wav"]
    (root / "test.txt").write_text("zoom in/clip 0.wav\n")
    with pytest.raises(ValueError, match="zoom in/clip 0.wav is listed as val and as test"):
        ds.folder(root, split_files={"val": "val.txt", "test": "test.txt"})
    (root / "splits.csv").write_text("file,split\nzoom in/clip 2.wav,testing\n")
    with pytest.raises(ValueError, match=r"splits.csv:2: split must be one of train \| val \| test, got 'testing'"):
        ds.folder(root, split_files="splits.csv")
    with pytest.raises(FileNotFoundError, match="task.split_files: .*nowhere.csv not found"):
        ds.folder(root, split_files="nowhere.csv")


def test_hash_split_is_the_readme_rule():
    # Values from the TensorFlow `which_set` formula on sha1(speaker): stable across runs.
    splits = [ds.hash_split(f"{s:08x}", 10, 10) for s in range(2000)]
    share = {k: splits.count(k) / 2000 for k in ds.SPLITS}
    assert 0.77 < share["train"] < 0.83 and 0.08 < share["val"] < 0.12 and 0.08 < share["test"] < 0.12


@needs_gsc
def test_shipped_test_set_is_split_speaker_disjoint_with_12_balanced_classes():
    clips = ds.speech_commands(GSC)
    assert len(clips) == 4890
    assert {c.word for c in clips if c.path.parent.name == "_unknown_"} >= {"backward", "bed", "zero"}
    balanced = ds.balance_gsc(clips, GSC, 16000, 16000, unknown_percent=10, silence_percent=10)
    sizes = {s: sum(c.split == s for c in balanced) for s in ds.SPLITS}
    assert sizes == {"train": 3992, "val": 482, "test": 415}
    speakers = {s: {c.speaker for c in balanced if c.split == s and c.word != ds.SILENCE} for s in ds.SPLITS}
    assert not (
        speakers["train"] & speakers["val"]
        or speakers["train"] & speakers["test"]
        or speakers["val"] & speakers["test"]
    )
    labels = {ds.gsc_label(c.word, "12") for c in balanced if c.split == "test"}
    assert labels == {*ds.GSC_WORDS, ds.SILENCE, ds.UNKNOWN}
    assert len({ds.gsc_label(c.word, "full") for c in clips}) == 36  # 35 words + _silence_


def test_silence_is_cut_from_background_noise_when_no_silence_folder(tmp_path):
    root = fake_gsc(tmp_path / "gsc")
    for p in (root / "_silence_").iterdir():
        p.unlink()
    (root / "_silence_").rmdir()
    write_wav(root / ds.NOISE_DIR / "white.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 48000), 16000)
    clips = ds.balance_gsc(ds.speech_commands(root), root, 16000, 16000, None, silence_percent=50)
    silence = [c for c in clips if c.word == ds.SILENCE]
    n_cmd = sum(c.word in ds.GSC_WORDS for c in clips)
    assert len(silence) >= n_cmd // 2 and all(c.path.parent.name == ds.NOISE_DIR for c in silence)
    decoded, problems = decode(silence, 16000, 16000)
    audio = np.stack(decoded)
    assert not any(problems) and audio.shape == (len(silence), 16000)
    assert (np.abs(audio).max(1) > 0).sum() >= len(silence) - 1


@needs_fsdd
def test_fsdd_official_and_held_out_speaker_splits():
    from tasks.speech.task import SpeechTask

    clips = ds.fsdd(FSDD)
    assert {s: sum(c.split == s for c in clips) for s in ds.SPLITS} == {"train": 2400, "val": 300, "test": 300}
    assert all(int(c.path.stem.split("_")[2]) < 5 for c in clips if c.split == "test")
    held = ds.fsdd(FSDD, "speaker")
    assert {c.speaker for c in held if c.split == "test"} == {"theo"}
    assert "theo" not in {c.speaker for c in held if c.split != "test"}
    # Another voice held out, through the task's settings (a leave-one-speaker-out fold).
    task = SpeechTask(dataset="fsdd", root=FSDD, split="speaker", test_speaker="lucas", val_speaker="theo",
                      sample_rate=8000, n_fft=256)
    voices = {s: {c.speaker for c in task._data.clips if c.split == s} for s in ds.SPLITS}
    assert voices == {"test": {"lucas"}, "val": {"theo"}, "train": {"george", "jackson", "nicolas", "yweweler"}}
    assert sum(c.split == "test" for c in task._data.clips) == 500
    with pytest.raises(ValueError, match=r"^task.test_speaker=bob: no such speaker in .*\(george, jackson, lucas, "):
        ds.fsdd(FSDD, "speaker", test_speaker="bob")
    with pytest.raises(ValueError, match="^task.test_speaker and task.val_speaker must differ, both are 'theo'$"):
        ds.fsdd(FSDD, "speaker", val_speaker="theo")


def test_folder_dataset_and_missing_data_errors(tmp_path):
    for cls in ("a", "b"):
        for n in range(20):
            write_wav(tmp_path / "f" / cls / f"clip{n}.wav", tone(100, 0.05, 8000), 8000)
    clips, split = ds.folder(tmp_path / "f")
    assert len(clips) == 40 and {c.split for c in clips} == set(ds.SPLITS) and split == "per_file"
    with pytest.raises(FileNotFoundError, match="speech_commands_v0.02_test") as e:
        ds.find_root("speech_commands", tmp_path / "nowhere")
    assert "download=true" in str(e.value)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "f" / "a")):
        ds.folder(tmp_path / "f" / "a")


def test_download_unpacks_the_public_archives_where_the_data_sets_are_looked_for(tmp_path, monkeypatch):
    """task.download=true with nothing there: the archives (stand-ins of the public ones, same
    layout) land as <data_dir>/speech_commands_v0.02 and <data_dir>/fsdd; with data there,
    nothing is fetched."""
    import shutil
    import tarfile
    import zipfile

    gsc = tmp_path / "gsc_src"  # v0.02's tar.gz holds the word folders at its top level
    for name in ("yes/aa_nohash_0.wav", "no/bb_nohash_0.wav", "_background_noise_/white_noise.wav"):
        write_wav(gsc / name, tone(300, 0.1, 16000), 16000)
    (gsc / "testing_list.txt").write_text("no/bb_nohash_0.wav\n")
    (gsc / "validation_list.txt").write_text("")
    with tarfile.open(tmp_path / "gsc.tar.gz", "w:gz") as tar:
        for path in sorted(gsc.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(gsc)), recursive=False)
    with zipfile.ZipFile(tmp_path / "fsdd.zip", "w") as z:  # a GitHub archive: <repo>-<commit>/recordings/
        for take in range(12):
            wav = write_wav(tmp_path / "fsdd_src" / f"3_theo_{take}.wav", tone(300, 0.1, 8000), 8000)
            z.write(wav, f"free-spoken-digit-dataset-26eb9aa/recordings/{wav.name}")
        z.writestr("free-spoken-digit-dataset-26eb9aa/README.md", "")
    archives = {ds.GSC_URL: tmp_path / "gsc.tar.gz", ds.FSDD_URL: tmp_path / "fsdd.zip"}
    fetched = []

    def urlretrieve(url, dest):
        fetched.append(url)
        shutil.copy(archives[url], dest)

    monkeypatch.setattr(ds.urllib.request, "urlretrieve", urlretrieve)
    data = tmp_path / "data"
    root = ds.find_root("speech_commands", data, download=True)
    assert root == data / "speech_commands_v0.02" and fetched == [ds.GSC_URL]
    clips = {c.path.name: c.split for c in ds.speech_commands(root)}
    assert clips["bb_nohash_0.wav"] == "test" and (root / "_background_noise_" / "white_noise.wav").is_file()
    root = ds.find_root("fsdd", data, download=True)
    assert root == data / "fsdd" and fetched == [ds.GSC_URL, ds.FSDD_URL]
    assert sorted(p.name for p in data.iterdir()) == ["fsdd", "speech_commands_v0.02"]  # no temporary left
    assert len(ds.fsdd(root)) == 12
    for dataset in ("speech_commands", "fsdd"):  # there now: not fetched again
        ds.find_root(dataset, data, download=True)
    assert len(fetched) == 2

    def offline(url, dest):
        raise ds.urllib.error.URLError("no network")

    monkeypatch.setattr(ds.urllib.request, "urlretrieve", offline)
    with pytest.raises(OSError, match=r"task.download=true: could not fetch .*speech_commands_v0.02.tar.gz"):
        ds.find_root("speech_commands", tmp_path / "elsewhere", download=True)
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing half-written


# --- augmentation and noise ------------------------------------------------------------------


def test_augmentation_only_in_training_and_reproducible():
    audio = torch.from_numpy(tone(300, 1.0, 16000).astype(np.float32)).repeat(4, 1)
    aug = Augment(noise=torch.rand(50000) * 2 - 1, noise_prob=1.0)
    assert torch.equal(aug.eval()(audio), audio)
    aug.train()
    torch.manual_seed(0)
    a = aug(audio)
    torch.manual_seed(0)
    assert torch.equal(a, aug(audio))
    assert a.shape == audio.shape and a.abs().max() <= 1 and not torch.allclose(a, audio, atol=1e-3)
    click = torch.zeros(64, 16000)
    click[:, 8000] = 0.5
    moved = Augment(gain_db=0, noise_prob=0).train()(click).argmax(1) - 8000
    assert moved.abs().max() <= 1600 and len(moved.unique()) > 20  # random shifts of <= 100 ms


def test_white_noise_augmentation_mixes_like_the_sweep_in_training_only():
    clean = torch.zeros(2000, 800)
    aug = Augment(8000, shift_ms=0, gain_db=0, noise_prob=0, white_noise_prob=0.5, white_noise_max=0.2)
    assert torch.equal(aug.eval()(clean), clean)
    torch.manual_seed(0)
    noisy = aug.train()(clean)
    level = noisy.abs().amax(1)  # silence + a U(-1, 1): peak just under a
    mixed = level > 0
    assert 0.4 < mixed.float().mean() < 0.6 and level.max() < 0.2 and level[mixed].min() >= 0
    assert abs(noisy[mixed].mean()) < 0.01
    ones = Augment(8000, shift_ms=0, gain_db=0, noise_prob=0, white_noise_prob=1.0, white_noise_max=0.2)
    # A full-scale clip is scaled by (1 - a), never clipped out of [-1, 1].
    assert ones.train()(torch.ones(100, 800)).abs().max() <= 1.0
    with pytest.raises(ValueError, match="white_noise_prob"):
        Augment(white_noise_prob=2.0)


def test_head_pools_cells_per_column():
    from tasks.speech.head import SegmentPoolHead

    head = SegmentPoolHead(12, 3, segments=2, cells_per_column=4)
    assert head.linear.in_features == 3 * 2
    cells = torch.zeros(1, 6, 12)
    cells[0, :, 1] = 1  # column 0 through its second cell ...
    other = cells.clone()
    other[0, :, :4] = 1  # ... or bursting: the same column features
    torch.testing.assert_close(head(cells), head(other))
    with pytest.raises(ValueError, match="cells_per_column"):
        SegmentPoolHead(10, 3, cells_per_column=4)


def test_head_answers_with_the_moving_average_of_its_weights_in_eval():
    from tasks.speech.head import SegmentPoolHead

    torch.manual_seed(0)
    head = SegmentPoolHead(4, 2, segments=1, average=0.5)
    start = head.linear.weight.detach().clone()
    x, y = torch.randn(8, 3, 4), torch.randint(0, 2, (8,))
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    weights = [start]
    for _ in range(3):  # each training forward first folds the weights of the last step in
        loss = torch.nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weights.append(head.linear.weight.detach().clone())
    # decay min(0.5, (1 + n) / (10 + n)) at step n: 0.1, 2/11, 0.25 (the warm-up), over the
    # weights before steps 0, 1, 2.
    expected = start.clone()
    for n, w in enumerate(weights[:3]):
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(head.average_weight, expected)
    assert head.average_steps == 3
    head.eval()  # validation / test: the average answers, and nothing moves
    with torch.no_grad():
        torch.testing.assert_close(head(x), x.mean(1) @ expected.t() + head.average_bias)
    torch.testing.assert_close(head.average_weight, expected)
    assert not torch.allclose(head(x), head.linear(x.mean(1)))
    assert "average_weight" in head.state_dict()  # checkpoints keep it
    assert "average_weight" not in SegmentPoolHead(4, 2).state_dict()  # off by default
    with pytest.raises(ValueError, match="head_average"):
        SegmentPoolHead(4, 2, average=1.0)


def test_noise_sweep_levels_and_fixed_noise():
    clips = ClipSet(torch.full((3, 1000), 16384, dtype=torch.int16), torch.tensor([0, 1, 2]))
    sweep = NoiseSweep(clips, [0.0, 0.25, 0.5], seed=7)
    assert len(sweep) == 9
    assert torch.equal(sweep[1]["audio"], torch.full((1000,), 0.5))
    item = sweep[2 * 3 + 1]  # level 0.5, clip 1
    assert item["noise_level"] == 2
    noise = (item["audio"] - 0.25) / 0.5
    assert noise.min() >= -1 and noise.max() <= 1 and abs(noise.mean()) < 0.1 and 0.5 < noise.std() < 0.65
    torch.testing.assert_close((sweep[3 + 1]["audio"] - 0.375) / 0.25, noise)  # same noise, other level
    assert torch.equal(NoiseSweep(clips, [0.0, 0.25, 0.5], seed=7)[7]["audio"], item["audio"])


# --- the task ----------------------------------------------------------------------------------


def test_speech_task_on_a_folder_data_set(tmp_path, capsys):
    from tasks.speech.task import SpeechTask

    two_tones(tmp_path / "d")
    task = SpeechTask(
        dataset="folder",
        root=tmp_path / "d",
        clip_seconds=0.5,
        n_mels=20,
        segments=2,
        noise_levels=[0.0, 0.5],
        output_dir=tmp_path / "out",
        batch_size=8,
        head_average=0.9,
    )
    assert task.classes == ["high", "low"] and task.input_size == 20 and not task.streaming
    assert task.figures() == {}  # nothing before the test stage
    data = task.datamodule()
    data.setup()
    batch = next(iter(data.test_dataloader()))
    x = task.encoder.eval()(batch)
    assert x.shape == (8, 51, 20)
    reset = task.reset_mask(batch)
    assert reset.shape == (8, 51) and reset[:, 0].all() and not reset[:, 1:].any()
    head = task.build_head(7)
    assert head.average == 0.9 and head.segments == 2
    logits = head(torch.randn(8, 51, 7))
    assert logits.shape == (8, 2) and task.loss(logits, batch).item() > 0
    # Perfect answers on clean clips, always "high" on noisy ones: the sweep counts both.
    n_test = len(data.sets["test"])
    for b in data.test_dataloader():
        answer = torch.where(b["noise_level"] == 0, b["label"], torch.zeros_like(b["label"]))
        task.update_metrics("test", torch.nn.functional.one_hot(answer, 2).float(), b, None)
    metrics = task.compute_metrics("test")
    n_high = int((data.sets["test"].labels == 0).sum())
    assert metrics["accuracy"] == 1.0 and metrics["noise_score"] == n_test + n_high
    assert task.compute_metrics("test") == metrics  # computing again changes nothing
    summary = task.summary()
    assert summary["test_accuracy"] == 1.0 and summary["noise_accuracy_by_level"]["0.5"] == n_high / n_test
    assert (tmp_path / "out" / "confusion_test.png").stat().st_size > 1000
    assert task.figures() == {"test/confusion": tmp_path / "out" / "confusion_test.png"}
    assert f"speech results in {(tmp_path / 'out').resolve()}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="task.dataset"):
        SpeechTask(dataset="timit", root=tmp_path / "d")
    for bad in (1.5, -0.1, "loud", False):  # false is not "off": that is null
        with pytest.raises(ValueError, match=r"task.voiced_threshold must be in \[0, 1\) or null"):
            SpeechTask(dataset="folder", root=tmp_path / "d", voiced_threshold=bad)
    for bad in (0, -10, "10dB", True):
        with pytest.raises(ValueError, match="task.voiced_range_db must be > 0 or null"):
            SpeechTask(dataset="folder", root=tmp_path / "d", voiced_range_db=bad)
    voiced = SpeechTask(dataset="folder", root=tmp_path / "d", clip_seconds=0.5, n_mels=20, voiced_threshold=0.3,
                        context_frames=1, output_dir=tmp_path / "out")
    assert voiced.input_size == 60
    x = voiced.encoder.eval()(batch)
    span = voiced.head_inputs(x, batch)["span"]
    # The 0.3 s tone sits in the middle of the 0.5 s clip: frames 9-41 of 51 (the windows that
    # overlap it), widened by the one frame of spliced context either side.
    clean = batch["noise_level"] == 0
    assert clean.sum() == 4 and span[clean].tolist() == [[8, 43]] * 4
    assert task.head_inputs(x, batch) == {}


@pytest.mark.parametrize("preset", ["speech_fsdd", "speech_commands"])
def test_speech_presets_compose_with_every_model(preset):
    """experiment=speech_* picks the speech task and a CPU-sized stack; model=lstm|cnn|sparse_cnn
    still wins."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    configs = Path(__file__).resolve().parent.parent / "configs"
    with initialize_config_dir(str(configs), version_base="1.3"):
        stack = compose("config", overrides=[f"experiment={preset}", "paths.output_dir=x"])
        lstm = compose("config", overrides=[f"experiment={preset}", "model=lstm", "paths.output_dir=x"])
        cnn = compose("config", overrides=[f"experiment={preset}", "model=cnn", "paths.output_dir=x"])
        sparse = compose("config", overrides=[f"experiment={preset}", "model=sparse_cnn", "paths.output_dir=x"])
    assert stack.task._target_.endswith("SpeechTask")
    same = lambda task: {k: v for k, v in task.items() if k != "cells_per_column"}  # noqa: E731
    assert same(lstm.task) == same(stack.task) == same(cnn.task) == same(sparse.task)
    assert stack.model.columns * stack.model.cells <= 4096  # minutes on a CPU, not hours
    assert lstm.model._target_.endswith("LSTMModel")
    assert stack.task.cells_per_column == stack.model.cells
    assert lstm.task.cells_per_column == cnn.task.cells_per_column == 1
    for cfg in (stack, lstm, cnn, sparse):
        width = cfg.task.n_mels * (2 if cfg.task.deltas else 1) * (2 * cfg.task.context_frames + 1)
        assert instantiate(cfg.model, input_size=width).output_size > 0
    # The CNN reads each step as maps of the mel bins: log-mel and deltas of each spliced frame.
    maps = instantiate(cnn.model, input_size=width).convs[0].in_channels
    assert maps == 2 * (2 * cnn.task.context_frames + 1)
    assert instantiate(sparse.model, input_size=width).sparse and sparse.task.cells_per_column == 1


def test_train_py_runs_speech_with_spliced_frames_and_the_voiced_span(tmp_path, monkeypatch):
    """The harness hands the task's voiced span to the head, in training and in test."""
    from test_harness import config

    import train
    from tasks.speech.head import SegmentPoolHead

    two_tones(tmp_path / "d")
    spans = []
    pool = SegmentPoolHead.forward
    record = lambda self, f, span=None: spans.append(span) or pool(self, f, span)  # noqa: E731
    monkeypatch.setattr(SegmentPoolHead, "forward", record)
    summary = train.train(config(
        tmp_path / "out", "task=speech", "task.dataset=folder", f"task.root={tmp_path / 'd'}", "task.sample_rate=8000",
        "task.n_fft=256", "task.clip_seconds=0.5", "task.n_mels=20", "task.context_frames=2",
        "task.voiced_threshold=0.5", "task.voiced_range_db=10", "task.noise_levels=[0.0]", "learning=local",
        "model.columns=256", "model.cells=4", "model.active_columns=16", "trainer.max_epochs=2", "optimizer.lr=0.01",
        "logger=none", "scheduler=cosine", "task.label_fraction=0.25", base=(),
    ))
    assert spans and all(s is not None and s.shape[1] == 2 for s in spans)
    assert summary["test_accuracy"] == 1.0  # two tones, a quarter of the labels: no excuse
    assert summary["label_fraction"] == 0.25 and 0 < summary["labelled_clips"] < 40
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["last.ckpt"]  # one, not last-v1 too
    # The cosine schedule stepped once per epoch: 0.01 -> 0.005 -> 0, and its state is saved.
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    (schedule,) = ckpt["lr_schedulers"]
    assert schedule["last_epoch"] == 2 and schedule["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    assert summary["train/lr"] == pytest.approx(0.005)  # the last epoch's lr, logged before the step


def test_train_py_runs_the_cnn_baseline_on_speech_and_logs_the_confusion_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from test_harness import config

    import train

    two_tones(tmp_path / "d")
    summary = train.train(config(
        tmp_path / "out", "task=speech", "task.dataset=folder", f"task.root={tmp_path / 'd'}", "task.sample_rate=8000",
        "task.n_fft=256", "task.clip_seconds=0.5", "task.n_mels=20", "task.context_frames=1", "task.deltas=true",
        "task.noise_levels=[0.0]", "model=cnn", "model.channels=8", "learning=backprop", "trainer.max_epochs=3",
        "optimizer.lr=0.01", "logger=wandb", base=(),
    ))
    assert summary["model"] == "cnn" and summary["test_accuracy"] == 1.0
    # The confusion matrix reaches wandb as an image, besides the run dir's PNG.
    (run,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    images = list((run / "files" / "media" / "images" / "test").glob("confusion_*.png"))
    assert len(images) == 1 and images[0].stat().st_size > 1000


@pytest.mark.parametrize("learning", [("learning=hybrid",), ("learning=local", "model.proximal_ahead=2")])
def test_a_speech_run_stopped_between_epochs_resumes_exactly(tmp_path, monkeypatch, learning):
    """A run killed in epoch 1 and resumed from its last.ckpt (written at the end of epoch 0,
    after validation and the scheduler's step) ends with the numbers and weights of the run
    that never stopped: the shuffle depends on (seed, epoch), starting an epoch's loader draws
    nothing from the RNG that the augmentation and the hybrid rule draw from. Under local
    learning with learned maps, the maps' optimizer group and input means resume too."""
    from test_harness import TIMING, config

    import train
    from predictive.harness.module import PredictiveModule

    two_tones(tmp_path / "d")
    run = ("task=speech", "task.dataset=folder", f"task.root={tmp_path / 'd'}", "task.sample_rate=8000",
           "task.n_fft=256", "task.clip_seconds=0.5", "task.n_mels=20", "task.context_frames=1",
           "task.noise_levels=[0.0,0.3]", *learning, "model.columns=128", "model.cells=1",
           "model.active_columns=8", "optimizer.lr=0.01", "scheduler=cosine", "trainer.max_epochs=3", "logger=none")
    whole = train.train(config(tmp_path / "whole", *run, base=()))

    step = PredictiveModule.training_step

    def killed_in_epoch_1(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PredictiveModule, "training_step", killed_in_epoch_1)
    with pytest.raises(RuntimeError, match="killed"):
        train.train(config(tmp_path / "killed", *run, base=()))
    monkeypatch.setattr(PredictiveModule, "training_step", step)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 2  # epoch 0's 2 batches, after its end
    assert saved["lr_schedulers"][0]["last_epoch"] == 1  # its scheduler step included
    resumed = train.train(config(tmp_path / "resumed", *run, f"ckpt_path={last}", base=()))

    assert {k: v for k, v in resumed.items() if k not in TIMING} == {k: v for k, v in whole.items() if k not in TIMING}
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "learning=local" in learning:  # the map learned: its rows left the initial ones, the mean is the inputs'
        initial = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert a["model.layers.0.input_steps"] > initial["model.layers.0.input_steps"] > 0
        key = "model.layers.0.feedforward.parametrizations.weight.original"
        assert not torch.equal(a[key], initial[key])


# --- label efficiency (task.label_fraction) ---------------------------------------------------


def test_the_labelled_subset_is_stratified_seeded_and_keeps_every_class():
    from tasks.speech.data import labelled_subset

    labels = np.repeat([0, 1, 2], [50, 30, 4])
    keep = labelled_subset(labels, 0.1, seed=0)
    assert [int(keep[labels == c].sum()) for c in range(3)] == [5, 3, 1]  # round(0.1 n), at least one
    assert np.array_equal(keep, labelled_subset(labels, 0.1, seed=0))
    assert not np.array_equal(keep, labelled_subset(labels, 0.1, seed=1))
    assert labelled_subset(labels, 1.0, seed=3).all()


def test_the_layers_learn_without_labels(tmp_path):
    # Under learning=local no label reaches the layers (their segments and, with proximal
    # learning, their maps): a run with a quarter of the labels ends with the very model of a
    # run with all of them; only the head differs. A second stage (init_from) can then read
    # one map at every label fraction.
    from test_harness import config

    import train

    two_tones(tmp_path / "d")
    common = ("task=speech", "task.dataset=folder", f"task.root={tmp_path / 'd'}", "task.sample_rate=8000",
              "task.n_fft=256", "task.clip_seconds=0.5", "task.n_mels=20", "task.context_frames=2",
              "task.noise_levels=[0.0]", "learning=local", "model.columns=64", "model.cells=2",
              "model.active_columns=8", "model.proximal_ahead=2", "trainer.max_epochs=2", "logger=none", "test=false")
    ends = {}
    for fraction in (1.0, 0.25):
        train.train(config(tmp_path / str(fraction), *common, f"task.label_fraction={fraction}", base=()))
        ends[fraction] = torch.load(tmp_path / str(fraction) / "checkpoints" / "last.ckpt",
                                    weights_only=True)["state_dict"]
    model = [k for k in ends[1.0] if k.startswith("model.")]
    map_key = "model.layers.0.feedforward.parametrizations.weight.original"
    assert ends[1.0]["model.layers.0.map_updates"] > 0 and map_key in model  # the map learned
    assert all(torch.equal(ends[1.0][k], ends[0.25][k]) for k in model)
    assert not torch.equal(ends[1.0]["head.linear.weight"], ends[0.25]["head.linear.weight"])


def test_withheld_labels_train_the_layers_under_local_and_leave_the_clips_out_otherwise(tmp_path):
    from tasks.speech.data import UNLABELLED
    from tasks.speech.task import SpeechTask

    two_tones(tmp_path / "d", speakers=40)
    common = dict(dataset="folder", root=tmp_path / "d", clip_seconds=0.5, n_mels=20, segments=2, batch_size=64,
                  label_fraction=0.1, label_seed=0)
    tasks = {kept: SpeechTask(**common, unlabelled_clips=kept) for kept in (True, False)}
    sets = {}
    for kept, task in tasks.items():
        data = task.datamodule()
        data.setup()
        sets[kept] = data.sets["train"]
    everything = SpeechTask(**{**common, "label_fraction": 1.0}).datamodule()
    everything.setup()
    n = len(everything.sets["train"])
    assert len(sets[True]) == n and len(sets[False]) == int((sets[True].labels != UNLABELLED).sum())
    assert 0.05 * n < len(sets[False]) < 0.15 * n
    # The same clips keep their labels whether the others are kept or not.
    known = sets[True].labels != UNLABELLED
    assert torch.equal(sets[True].audio[known], sets[False].audio)
    assert torch.equal(sets[True].labels[known], sets[False].labels)
    assert sorted(set(sets[False].labels.tolist())) == [0, 1]
    # A batch without a label gives a zero loss and no gradient; its clips count for no accuracy.
    task = tasks[True]
    logits = torch.randn(4, 2, requires_grad=True)
    batch = {"label": torch.full((4,), UNLABELLED), "noise_level": torch.zeros(4, dtype=torch.long)}
    loss = task.loss(logits, batch)
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()
    mixed = {"label": torch.tensor([0, UNLABELLED, 1, UNLABELLED]), "noise_level": torch.zeros(4, dtype=torch.long)}
    assert task.loss(logits, mixed).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 1])).item())
    task.update_metrics("train", torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1]), 2).float(), mixed, None)
    assert task.compute_metrics("train")["accuracy"] == 1.0  # the two labelled clips, both right
    assert task.summary()["labelled_clips"] == len(sets[False])
    from test_harness import config

    from predictive.harness.settings import SettingError, check_settings

    with pytest.raises(SettingError, match=r"task.label_fraction=0.0: "):
        check_settings(config("out", "task=speech", "task.label_fraction=0.0", base=[]))
    for learning, kept in (("local", True), ("frozen", False), ("backprop", False), ("hybrid", False)):
        assert config("out", "task=speech", f"learning={learning}", base=[]).task.unlabelled_clips is kept
