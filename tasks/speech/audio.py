"""Reading 16-bit PCM wav files as float waveforms at one sample rate and one length.

Only the standard library's `wave` and numpy/scipy are used, so no audio backend has to be
installed. Python 3.11's `wave` reads plain PCM headers (what Speech Commands and FSDD ship);
WAVE_FORMAT_EXTENSIBLE headers need Python >= 3.12 and are reported as unreadable before that.
"""

import wave
from math import gcd

import numpy as np
from scipy.signal import resample_poly


class AudioError(ValueError):
    """A file that cannot be used as 16-bit PCM audio; the message starts with the file."""


def read_wav(path) -> tuple[np.ndarray, int]:
    """Return (samples as float32 in [-1, 1), sample rate); channels are averaged to mono."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            frames = f.getnframes()
            raw = f.readframes(frames)
    except (wave.Error, EOFError, OSError) as e:
        raise AudioError(f"{path}: not a readable wav file ({str(e) or type(e).__name__})") from e  # EOFError: no text
    if width != 2:
        raise AudioError(f"{path}: {8 * width}-bit samples; only 16-bit PCM is supported")
    if frames == 0:
        raise AudioError(f"{path}: the file holds no samples")
    # `wave` returns what is there when the data chunk is shorter than its header says.
    if len(raw) < frames * channels * width:
        got = len(raw) // (channels * width)
        raise AudioError(f"{path}: truncated: header says {frames} frames, file holds {got}")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(frames, channels).mean(axis=1), rate


def resample(x: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from `rate` to `target_rate`."""
    if rate == target_rate:
        return x
    g = gcd(rate, target_rate)
    return resample_poly(x, target_rate // g, rate // g).astype(np.float32)


def fix_length(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad or crop around the centre, so a short word sits mid-clip like in Speech Commands."""
    n = len(x)
    if n >= length:
        start = (n - length) // 2
        return x[start : start + length]
    left = (length - n) // 2
    return np.pad(x, (left, length - n - left))


def load_clip(path, sample_rate: int, length: int) -> np.ndarray:
    """One file as a float32 clip of exactly `length` samples at `sample_rate`."""
    x, rate = read_wav(path)
    return fix_length(resample(x, rate, sample_rate), length)
