"""Training-time waveform augmentation for keyword spotting, batched on the waveforms' device.

As in TensorFlow's speech_commands recipe: a random time shift (zero filled), a random gain,
and, with probability `noise_prob`, background noise mixed in at a random volume. Data sets
without a background-noise folder (FSDD, custom folders) can still be trained on noise: with
probability `white_noise_prob` a clip becomes (1 - a) A + a U(-1, 1), a drawn uniformly from
[0, white_noise_max), the same mixing as the test-time noise sweep (Ahmad & Scheinkman 2019).
Active only in training mode, so validation, test and the noise sweep see the clean clips.
"""

import torch
from torch import nn


class Augment(nn.Module):
    def __init__(
        self,
        sample_rate=16000,
        shift_ms=100.0,
        gain_db=6.0,
        noise_prob=0.8,
        noise_volume=0.1,
        white_noise_prob=0.0,
        white_noise_max=0.1,
        noise: torch.Tensor | None = None,
    ):
        super().__init__()
        if not 0.0 <= white_noise_prob <= 1.0:
            raise ValueError(f"task.augment.white_noise_prob must be in [0, 1], got {white_noise_prob}")
        if not 0.0 <= white_noise_max <= 1.0:
            raise ValueError(f"task.augment.white_noise_max must be in [0, 1], got {white_noise_max}")
        self.shift = int(sample_rate * shift_ms / 1000)
        self.gain_db, self.noise_prob, self.noise_volume = gain_db, noise_prob, noise_volume
        self.white_noise_prob, self.white_noise_max = white_noise_prob, white_noise_max
        # All background recordings joined end to end (1-D); a crop may straddle two files,
        # which is rare (files are ~1 min long) and harmless for noise. Not persistent: it is
        # data, reloaded from the data set, not a learned parameter.
        self.register_buffer("noise", noise if noise is not None else torch.zeros(0), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return audio
        batch, length = audio.shape
        dev = audio.device
        if self.shift:
            offset = torch.randint(-self.shift, self.shift + 1, (batch, 1), device=dev)
            idx = torch.arange(length, device=dev) - offset
            inside = (idx >= 0) & (idx < length)
            audio = torch.gather(audio, 1, idx.clamp(0, length - 1)) * inside
        if self.gain_db:
            db = (torch.rand(batch, 1, device=dev) * 2 - 1) * self.gain_db
            audio = audio * 10 ** (db / 20)
        if self.noise_prob and len(self.noise) > length:
            start = torch.randint(0, len(self.noise) - length, (batch, 1), device=dev)
            crops = self.noise[start + torch.arange(length, device=dev)]
            volume = torch.rand(batch, 1, device=dev) * self.noise_volume
            volume = volume * (torch.rand(batch, 1, device=dev) < self.noise_prob)
            audio = audio + volume * crops
        audio = audio.clamp(-1, 1)
        if self.white_noise_prob and self.white_noise_max:
            alpha = torch.rand(batch, 1, device=dev) * self.white_noise_max
            alpha = alpha * (torch.rand(batch, 1, device=dev) < self.white_noise_prob)
            audio = (1 - alpha) * audio + alpha * (torch.rand_like(audio) * 2 - 1)
        return audio
