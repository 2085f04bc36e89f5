"""Log-mel features in torch: batched, on whatever device the waveforms are on.

The mel filterbank follows the Slaney/librosa construction (triangles between mel-spaced
edges, each scaled to unit area, "slaney" normalisation); `mel_scale` picks the Slaney
(linear below 1 kHz, log above) or the HTK (2595 log10(1 + f/700)) mel formula. With the
same settings it equals `librosa.filters.mel(..., htk=mel_scale == "htk")`, and the power
spectrogram equals `abs(librosa.stft(..., center=True, pad_mode="constant"))**2`.
"""

import math

import numpy as np
import torch
from torch import nn


def hz_to_mel(f, scale: str = "slaney"):
    f = np.asarray(f, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above.
    log_step = math.log(6.4) / 27.0
    return np.where(f < 1000.0, f * 3.0 / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / log_step)


def mel_to_hz(m, scale: str = "slaney"):
    m = np.asarray(m, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    log_step = math.log(6.4) / 27.0
    return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * np.exp(log_step * (m - 15.0)))


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None, scale: str = "slaney"
) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters with unit area (float32)."""
    if scale not in ("slaney", "htk"):
        raise ValueError(f"task.mel_scale must be 'slaney' or 'htk', got {scale!r}")
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= task.f_min < task.f_max <= sample_rate/2, got {f_min}, {f_max}")
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min, scale), hz_to_mel(f_max, scale), n_mels + 2), scale)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(weights).float()


class LogMel(nn.Module):
    """(B, samples) waveforms -> (B, frames, n_mels) log-mel frames, normalised per utterance.

    normalize: "utterance" subtracts each clip's mean and divides by its std (over frames and
    bins), so loud and quiet clips give frames on the same scale; "channel" does it per mel bin
    (cepstral mean/variance normalisation); "none" leaves log power as is. deltas=True appends
    the time derivative of each bin (central difference), doubling the width.

    context_frames=c splices each frame with its c neighbours on either side (zeros beyond the
    clip), frames t-c .. t+c side by side: a model that reads one frame per step then sees
    +-c x hop of the sound at once, as a time-convolution would (c=4: +-40 ms).
    """

    def __init__(
        self,
        sample_rate=16000,
        n_fft=512,
        win_length=400,
        hop_length=160,
        n_mels=40,
        f_min=20.0,
        f_max=None,
        mel_scale="slaney",
        log_floor=1e-6,
        normalize="utterance",
        deltas=False,
        context_frames=0,
    ):
        super().__init__()
        if not isinstance(context_frames, int) or isinstance(context_frames, bool) or context_frames < 0:
            raise ValueError(f"task.context_frames must be an integer >= 0, got {context_frames!r}")
        if normalize not in ("utterance", "channel", "none"):
            raise ValueError(f"task.normalize must be utterance|channel|none, got {normalize!r}")
        if win_length > n_fft:
            raise ValueError(f"task.win_length ({win_length}) must not exceed task.n_fft ({n_fft})")
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.log_floor, self.normalize, self.deltas = log_floor, normalize, deltas
        self.n_mels, self.context_frames = n_mels, context_frames
        self.output_size = n_mels * (2 if deltas else 1) * (2 * context_frames + 1)
        # Buffers follow the module to the model's device; not persistent because they are
        # rebuilt from the config, which keeps checkpoints small and free of derived data.
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer(
            "filters", mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, mel_scale), persistent=False
        )

    def num_frames(self, samples: int) -> int:
        return samples // self.hop_length + 1

    def power(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, n_fft // 2 + 1, frames) power spectrogram."""
        spec = torch.stft(
            audio,
            self.n_fft,
            self.hop_length,
            self.win_length,
            self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        return spec.real**2 + spec.imag**2

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, frames, n_mels) log mel power, before normalisation."""
        return torch.log(self.filters @ self.power(audio) + self.log_floor).transpose(1, 2)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.features(self.log_mel(audio))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, frames, n_mels) log mel power -> (B, frames, output_size) normalised frames, with
        deltas and spliced neighbours as configured."""
        if self.normalize != "none":
            dims = (1, 2) if self.normalize == "utterance" else (1,)
            x = (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-5)
        if self.deltas:
            x = torch.cat([x, torch.gradient(x, dim=1)[0]], dim=2)
        c, t = self.context_frames, x.shape[1]
        if c:
            padded = nn.functional.pad(x, (0, 0, c, c))
            x = torch.cat([padded[:, i : i + t] for i in range(2 * c + 1)], dim=2)
        return x


def frame_energy(log_mel: torch.Tensor) -> torch.Tensor:
    """(B, T, n_mels) log mel power -> (B, T) log energy of each frame (natural log).

    The energy is made by a frame's loudest bins, so noise that fills the quiet bins moves it
    little where the word is loud; the mean of the log bins would move with every quiet bin."""
    return log_mel.logsumexp(-1)


def voiced_span(
    energy: torch.Tensor, threshold: float, margin: int = 0, range_db: float | None = None
) -> torch.Tensor:
    """(B, T) log energy -> (B, 2) frames [start, end) from the first to the last frame louder
    than min + threshold x (max - min) of its clip and, with `range_db`, within range_db of its
    loudest frame; widened by `margin` frames each side.

    Where the word lies in a clip varies by hundreds of ms (recording, the time-shift
    augmentation); pooling over this span instead of the whole clip lines the word's parts up
    from clip to clip. The range below the loudest frame keeps the span where it is when noise
    raises a quiet clip's floor (the fraction of the range alone shrinks it towards the word's
    core as the floor rises). A clip of equal loudness throughout spans all of it."""
    b, t = energy.shape
    low, high = energy.aminmax(dim=1, keepdim=True)
    level = low + threshold * (high - low)
    if range_db is not None:
        level = torch.maximum(level, high - range_db * math.log(10) / 10)  # dB of power -> natural log
    loud = energy > level
    frame = torch.arange(t, device=energy.device).expand(b, t)
    start = torch.where(loud, frame, t).amin(1)
    end = torch.where(loud, frame + 1, 0).amax(1)
    quiet = ~loud.any(1)
    start, end = start.masked_fill(quiet, 0), end.masked_fill(quiet, t)
    return torch.stack([(start - margin).clamp(min=0), (end + margin).clamp(max=t)], 1)
