"""Waveform augmentation for speech datasets: what makes a keyword model hold up on voices it never heard.

Synthetic speech from one synthesiser has a narrow "accent": formant positions, spectral tilt and bandwidth
of its voices. :class:`SpeechAugment` widens it at the waveform level, before any feature extraction:

* **vocal-tract-length / speed perturbation**: resampling by a random factor (0.85-1.15 by default) moves
  formants and pitch together and changes the tempo, as sox ``speed`` does;
* **random equaliser**: one to three bell-shaped boosts or cuts at random centre frequencies, widths and
  gains (a different microphone, room or synthesiser colouring), plus occasional band limiting (telephone-like
  low-pass, rumble-removing high-pass), applied as one zero-phase gain curve in the frequency domain;
* **random gain**.

It is a dataset ``transform`` (``KeywordSpeech(..., transform=SpeechAugment())``, or ``augment = "speech"`` in a
recipe's ``[data.train]`` table), so it applies to training data only and knows nothing of models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidInputError

__all__ = ["SpeechAugment", "build_transform"]


@dataclass
class SpeechAugment:
    """Random speed/formant shift, equaliser, band limits and gain on a ``[channels, samples]`` waveform.

    The output keeps the input's length (a stretched clip is centre-cropped, a shortened one zero-padded on
    both sides), so a word placed inside a 1 s clip stays inside it. Randomness comes from ``torch``'s global
    generator (seeded by the training loop, saved in its checkpoints).
    """

    sample_rate: int = 16000
    speed_range: tuple[float, float] = (0.85, 1.15)
    eq_prob: float = 0.8
    eq_bands: tuple[int, int] = (1, 3)
    eq_gain_db: float = 10.0
    lowpass_prob: float = 0.25
    lowpass_hz: tuple[float, float] = (3000.0, 7000.0)
    highpass_prob: float = 0.25
    highpass_hz: tuple[float, float] = (60.0, 400.0)
    gain_db: float = 6.0

    def __post_init__(self) -> None:
        lo, hi = self.speed_range
        if not 0.5 <= lo <= hi <= 2.0:
            raise InvalidInputError(f"speed_range must lie in [0.5, 2], got {self.speed_range}")
        for name in ("eq_prob", "lowpass_prob", "highpass_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidInputError(f"{name} must be in [0, 1]")

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def __call__(self, wav: Tensor) -> Tensor:
        if wav.ndim != 2 or not wav.is_floating_point():
            raise InvalidInputError(f"expected a float [channels, samples] waveform, got {wav.dtype} {tuple(wav.shape)}")
        n, sr = wav.shape[-1], self.sample_rate
        x = wav
        speed = self._uniform(*self.speed_range)
        if abs(speed - 1.0) > 1e-3:  # play `speed` times faster: m = n / speed samples read at the same rate
            m = max(2, round(n / speed))
            x = torch.nn.functional.interpolate(x[None], size=m, mode="linear", align_corners=False)[0]
            if m >= n:
                start = (m - n) // 2
                x = x[..., start : start + n]
            else:
                left = (n - m) // 2
                x = torch.nn.functional.pad(x, (left, n - m - left))
        # equaliser as one zero-phase gain curve in the frequency domain (dB over log-frequency)
        # (numpy throughout: tiny single-threaded maths; torch's thread pool stalls on a busy machine)
        logf = np.log(np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 20.0))
        gain_db = np.zeros_like(logf)
        if float(torch.rand(())) < self.eq_prob:
            bands = int(torch.randint(self.eq_bands[0], self.eq_bands[1] + 1, ()))
            for _ in range(bands):
                centre = self._uniform(math.log(150.0), math.log(0.8 * sr / 2))
                width = self._uniform(0.15, 0.8)  # natural-log units: a third of an octave to two octaves
                gain = self._uniform(-self.eq_gain_db, self.eq_gain_db)
                gain_db += gain * np.exp(-0.5 * ((logf - centre) / width) ** 2)
        if float(torch.rand(())) < self.lowpass_prob:  # 24 dB per octave above the cut-off
            cut = min(self._uniform(*self.lowpass_hz), 0.45 * sr)
            gain_db -= 24.0 * np.maximum(logf - math.log(cut), 0.0) / math.log(2.0)
        if float(torch.rand(())) < self.highpass_prob:
            cut = self._uniform(*self.highpass_hz)
            gain_db -= 24.0 * np.maximum(math.log(cut) - logf, 0.0) / math.log(2.0)
        gain_db += self._uniform(-self.gain_db, self.gain_db)
        gain_db = np.maximum(gain_db, -80.0)
        spec = np.fft.rfft(x.numpy().astype(np.float64), axis=-1) * (10 ** (gain_db / 20))
        x = torch.from_numpy(np.fft.irfft(spec, n=n, axis=-1).astype(np.float32))
        peak = float(x.abs().max())
        if peak > 0.999:  # never clip: the equaliser can boost
            x = x * (0.999 / peak)
        return x.contiguous()


def build_transform(spec: str | dict | None) -> SpeechAugment | None:
    """A transform from a recipe value: ``"speech"``, ``{"kind": "speech", ...fields}`` or ``None``."""
    if spec is None or spec is False:
        return None
    if spec == "speech" or spec is True:
        return SpeechAugment()
    if isinstance(spec, dict) and spec.get("kind", "speech") == "speech":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "kind"}
        try:
            return SpeechAugment(**fields)
        except TypeError as e:
            raise InvalidInputError(f"bad speech augmentation settings {spec}: {e}") from e
    raise InvalidInputError(f"unknown augmentation {spec!r}; use 'speech' or a table with kind = 'speech'")
