"""Audio adapter: waveform (file, array or tensor) → normalised Kaldi log-mel images ``1 × mel × time``.

The processor follows the official Speech Commands pipeline (AST's, spec §11.1): mono 16 kHz waveform, clip
mean removed, Kaldi-compatible filterbank (128 mel bins, 25 ms Hanning frames every 10 ms, ``htk_compat``, no
energy, no dither), zero-padded/cropped to ``target_frames`` in the log-mel domain, normalised with the official
dataset constants ``(fbank + 6.845978) / (2 · 5.5654526)`` and laid out with mel on H and time on W.

What we add to the official recipe: any channel count (mixed down by averaging) and any sample rate
(``torchaudio.functional.resample``), files of any format (soundfile for WAV/FLAC, PyAV for everything else),
and recordings longer than one window scored as several sliding windows stacked on the leading axis (the
caller pools the scores). The embedding is the identity (``out_channels = 1``).

Files are processed as a stream: blocks are decoded, mixed down, resampled and cut into windows as they
arrive, so the memory a long recording needs is its output plus a few blocks, not its decoded signal. Up to
:data:`_EXACT_RESAMPLE_SAMPLES` native samples are resampled in one call (bit-identical to resampling the
whole signal); longer recordings are resampled block by block with the same polyphase kernel (equal up to
float rounding). Rates whose sinc kernel would be huge (a rate sharing no factor with 16 kHz, such as
44101 Hz) fall back to antialiased linear interpolation.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidInputError, UnsupportedFormatError
from .base import AdapterConfig, ModalityAdapter, register_adapter

__all__ = ["AUDIO_NORM_MEAN", "AUDIO_NORM_STD", "AudioAdapter", "AudioConfig", "load_audio"]

logger = logging.getLogger(__name__)

#: official (AST Speech Commands) dataset statistics of the log-mel filterbank
AUDIO_NORM_MEAN = -6.845978
AUDIO_NORM_STD = 5.5654526

_SOUNDFILE_SUFFIXES = {".wav", ".flac"}
#: native-rate frames read from a file per block
_BLOCK_FRAMES = 1 << 16
#: recordings up to this many native samples are resampled in one call (identical to whole-signal resampling)
_EXACT_RESAMPLE_SAMPLES = 1 << 19
#: sinc kernels with more elements than this (rates sharing no factor with the target) use interpolation
_MAX_SINC_KERNEL = 1 << 22
_NONFINITE = "audio contains NaN or Inf samples; clean or clip the signal first"
_TOO_LOUD = (
    "audio amplitudes are too large to analyse in float32 (the filterbank overflows); "
    "scale the waveform to [-1, 1]"
)


@dataclasses.dataclass
class AudioConfig(AdapterConfig):
    """Preprocessing of the audio adapter (saved in bundles).

    ``target_frames=None`` means "the frame count of one full window" (98 frames for 1 s at 16 kHz with Kaldi's
    ``snip_edges``). The official Speech Commands setting is :meth:`official` (1 s clips padded to 128 frames).
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    target_frames: int | None = None
    window_seconds: float = 1.0
    hop_seconds: float = 0.5
    norm_mean: float = AUDIO_NORM_MEAN
    norm_std: float = AUDIO_NORM_STD
    #: subtract each mel bin's mean over the window's frames first (cepstral mean normalisation): removes a
    #: fixed spectral colouring of the recording chain or the synthesiser, and any overall gain
    mean_norm: bool = False
    # train=True augmentation (official AST Speech Commands recipe)
    freq_mask: int = 48
    time_mask: int = 48
    noise: bool = True
    roll: int = 10

    @classmethod
    def official(cls) -> AudioConfig:
        """The official Speech Commands V2 setting: 1 s clips, 128 mel bins × 128 frames."""
        return cls(target_frames=128)

    def frames_per_window(self) -> int:
        """Kaldi frames (``snip_edges=True``) in one ``window_seconds`` window."""
        n = round(self.window_seconds * self.sample_rate)
        win = round(self.frame_length_ms * self.sample_rate / 1000)
        shift = round(self.frame_shift_ms * self.sample_rate / 1000)
        return 1 + (max(n, win) - win) // shift

    def num_frames(self) -> int:
        """The time width ``W`` of every processed image."""
        return self.target_frames if self.target_frames is not None else self.frames_per_window()


# --------------------------------------------------------------------------------------------- decoding


def _check_rate(sample_rate: Any) -> int:
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        raise InvalidInputError(f"sample_rate must be a number of Hz, got {sample_rate!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise InvalidInputError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
    if rate != round(rate):
        logger.warning("non-integer sample rate %s Hz rounded to %d Hz", rate, round(rate))
    if round(rate) < 1:
        raise InvalidInputError(f"sample_rate {sample_rate!r} Hz is below 1 Hz; pass the rate in Hz")
    return round(rate)


def _array_to_channels(x: np.ndarray | Tensor) -> Tensor:
    """A 1-D or 2-D array/tensor → float32 ``channels × samples`` (the shorter axis of 2-D input is channels)."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.number)) or np.iscomplexobj(x):
            raise InvalidInputError(f"audio arrays must be real numbers, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            # PCM integers → [-1, 1) as soundfile/torchaudio do (unsigned PCM is offset by its midpoint)
            mid = (int(info.max) + 1) // 2 if info.min == 0 else 0
            x = (x.astype(np.float64) - mid) / float(max(abs(int(info.min)), mid) or 1)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        if x.dtype == torch.bool or x.is_complex():
            raise InvalidInputError(f"audio tensors must be real numbers, got dtype {x.dtype}")
        if not x.is_floating_point():
            return _array_to_channels(x.detach().cpu().numpy())
        t = x.detach().to("cpu", torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    elif t.dim() == 2:
        if t.shape[0] > t.shape[1]:  # frames × channels (soundfile's layout) → channels × frames
            t = t.t()
    else:
        raise InvalidInputError(
            f"audio must be 1-D (samples) or 2-D (channels × samples or samples × channels), got shape {tuple(t.shape)}"
        )
    return t.contiguous()


def _riff_truncation(path: Path) -> str | None:
    """For a RIFF/WAVE file, say how it is truncated (declared ``data`` bytes beyond the file's end), else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                cid, clen = struct.unpack("<4sI", f.read(8))
                if cid == b"data":
                    if clen in (0, 0xFFFFFFFF):  # streaming writers leave the size open
                        return None
                    have = size - pos - 8
                    return (
                        None if have >= clen else f"header declares {clen} data bytes, the file holds {have}"
                    )
                pos += 8 + clen + (clen & 1)
    except OSError:
        return None
    return None


def _read_soundfile(path: Path) -> tuple[Tensor, int]:
    import soundfile as sf

    trunc = _riff_truncation(path)
    if trunc is not None:
        raise UnsupportedFormatError(f"audio file {path} is truncated ({trunc}); re-export or re-download it")
    with sf.SoundFile(str(path)) as f:
        declared = f.frames
        data = f.read(dtype="float32", always_2d=True)
        rate = f.samplerate
    if 0 < data.shape[0] < declared:
        raise UnsupportedFormatError(
            f"audio file {path} is truncated (read {data.shape[0]} of {declared} frames); re-export or re-download it"
        )
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def _read_pyav(path: Path) -> tuple[Tensor, int]:
    import av

    chunks: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise UnsupportedFormatError(
                f"{path} has no audio stream; pass an audio file (wav, flac, mp3, ogg, …)"
            )
        stream = container.streams.audio[0]
        declared = None
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            declared = container.duration / 1e6
        resampler = av.AudioResampler(format="fltp")  # planar float, keeps layout and rate
        rate = 0
        for frame in container.decode(stream):
            rate = frame.sample_rate
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks or rate <= 0:
        raise InvalidInputError(f"audio file {path} decodes to no samples (empty recording)")
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    got = data.shape[1] / rate
    if declared is not None and declared > 0 and got < 0.9 * declared - 0.1:
        raise UnsupportedFormatError(
            f"audio file {path} looks truncated: decoded {got:.2f} s of the {declared:.2f} s its header declares; "
            "re-export or re-download it"
        )
    return torch.from_numpy(data), int(rate)


def load_audio(path: str | os.PathLike[str]) -> tuple[Tensor, int]:
    """Decode an audio file → (float32 ``channels × samples`` in [-1, 1], sample rate).

    WAV and FLAC go through soundfile, anything else (MP3, OGG/Opus/Vorbis, M4A/AAC, the audio track of a
    video, …) through PyAV. Missing files raise :class:`InvalidInputError`; undecodable, truncated or
    audio-less files :class:`UnsupportedFormatError`; files without samples :class:`InvalidInputError`.
    """
    p = _existing_audio_file(Path(path))
    errors: list[str] = []
    if p.suffix.lower() in _SOUNDFILE_SUFFIXES:
        import soundfile as sf

        try:
            wave, rate = _read_soundfile(p)
        except sf.LibsndfileError as e:
            errors.append(f"soundfile: {e}")
        else:
            if wave.shape[1] == 0:
                raise InvalidInputError(f"audio file {p} holds no samples (zero-length recording)")
            return wave, rate
    import av

    try:
        wave, rate = _read_pyav(p)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, InvalidInputError):
            raise
        errors.append(f"PyAV: {type(e).__name__}: {e}")
        raise UnsupportedFormatError(
            f"cannot decode audio file {p} (corrupt or unsupported format): {'; '.join(errors)}"
        ) from e
    return wave, rate


def _sinc_kernel_elements(orig: int, new: int) -> int:
    """Elements of torchaudio's sinc resampling kernel for ``orig → new`` Hz (default filter settings)."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = math.ceil(6 * o / (min(o, n) * 0.99))
    return n * (2 * width + o)


def _resample(mono: Tensor, orig: int, new: int) -> Tensor:
    """Whole-signal resampling: torchaudio's sinc resampler, or interpolation where its kernel would be huge."""
    import torchaudio.functional as AF

    if orig == new:
        return mono
    if _sinc_kernel_elements(orig, new) <= _MAX_SINC_KERNEL:
        return AF.resample(mono, orig_freq=orig, new_freq=new)
    logger.warning("%d Hz shares no factor with %d Hz: resampling by interpolation", orig, new)
    m = max(1, math.ceil(mono.shape[-1] * new / orig))
    x = F.interpolate(mono.view(1, 1, 1, -1), size=(1, m), mode="bilinear", antialias=True, align_corners=False)
    return x.view(-1)


def _resampled_length(length: int, orig: int, new: int) -> int | None:
    """Samples :func:`_resample` returns for ``length`` input samples (None where it is not cheap to know)."""
    if orig == new:
        return length
    if _sinc_kernel_elements(orig, new) > _MAX_SINC_KERNEL:
        return max(1, math.ceil(length * new / orig))
    g = math.gcd(orig, new)
    return int(torch.ceil(torch.as_tensor(new // g * length / (orig // g))))


class _StreamResampler:
    """torchaudio's polyphase sinc resampler applied block by block (same kernel, same output length)."""

    def __init__(self, orig: int, new: int) -> None:
        import torchaudio.transforms as T

        r = T.Resample(orig, new, dtype=torch.float32)  # the kernel AF.resample builds for float32 input
        self.kernel, self.width = r.kernel, r.width
        self.o, self.n = orig // r.gcd, new // r.gcd
        self.buf = torch.zeros(self.width)  # the left zero padding
        self.length = 0
        self.emitted = 0

    def _groups(self) -> Tensor:
        k = self.kernel.shape[-1]
        if self.buf.shape[0] < k:
            return self.buf.new_zeros(0)
        g = (self.buf.shape[0] - k) // self.o + 1
        y = F.conv1d(self.buf[: (g - 1) * self.o + k].view(1, 1, -1), self.kernel, stride=self.o)
        self.buf = self.buf[g * self.o :]
        return y[0].t().reshape(-1)

    def push(self, x: Tensor) -> Tensor:
        self.length += x.shape[0]
        self.buf = torch.cat([self.buf, x])
        y = self._groups()
        self.emitted += y.shape[0]
        return y

    def finish(self) -> Tensor:
        self.buf = torch.cat([self.buf, self.buf.new_zeros(self.width + self.o)])  # the right zero padding
        y = self._groups()
        target = int(torch.ceil(torch.as_tensor(self.n * self.length / self.o)))
        return y[: max(0, target - self.emitted)]


def _mono_stream(blocks: Iterator[Tensor], rate: int, new_rate: int) -> Iterator[Tensor]:
    """``channels × samples`` blocks at ``rate`` → validated mono blocks at ``new_rate``.

    The first :data:`_EXACT_RESAMPLE_SAMPLES` samples are held back: a recording that ends before that is
    resampled in one call, exactly as a whole waveform is; a longer one goes through :class:`_StreamResampler`.
    """
    held: list[Tensor] = []
    count = 0
    stream: _StreamResampler | None = None
    passthrough = rate == new_rate
    approx = not passthrough and _sinc_kernel_elements(rate, new_rate) > _MAX_SINC_KERNEL
    for block in blocks:
        if block.shape[-1] == 0:
            continue
        if not torch.isfinite(block).all():
            raise InvalidInputError(_NONFINITE)
        mono = block.mean(dim=0)
        if passthrough:
            yield mono
            continue
        if stream is None:
            held.append(mono)
            count += mono.shape[0]
            if approx or count <= _EXACT_RESAMPLE_SAMPLES:
                continue
            stream = _StreamResampler(rate, new_rate)
            for h in held[:-1]:
                yield stream.push(h)
            held = []
        yield stream.push(mono)
    if stream is not None:
        yield stream.finish()
    elif held:
        yield _resample(torch.cat(held), rate, new_rate)


class _WindowCutter:
    """Cut a stream of samples into the windows :meth:`AudioAdapter.window_starts` lists, in order."""

    def __init__(self, win: int, hop: int) -> None:
        self.win, self.hop = win, hop
        self.buf = torch.zeros(0)
        self.buf_start = 0  # stream index of buf[0]
        self.total = 0
        self.next_start = 0
        self.last: int | None = None

    def push(self, x: Tensor) -> Iterator[Tensor]:
        self.buf = torch.cat([self.buf, x]) if self.buf.numel() else x
        self.total += x.shape[0]
        while self.next_start + self.win <= self.total:
            lo = self.next_start - self.buf_start
            yield self.buf[lo : lo + self.win]
            self.last = self.next_start
            self.next_start += self.hop
        keep_from = min(self.next_start, self.total - self.win)
        if keep_from > self.buf_start:
            self.buf = self.buf[keep_from - self.buf_start :]
            self.buf_start = keep_from

    def finish(self) -> Iterator[Tensor]:
        if self.total == 0:
            return
        if self.total <= self.win:
            if self.last is None:
                yield self.buf
            return
        if self.last != self.total - self.win:
            yield self.buf[self.total - self.win - self.buf_start :]


def _soundfile_blocks(path: Path, f: Any) -> Iterator[Tensor]:
    """Blocks of an open ``soundfile.SoundFile`` (closed at the end); a short read means a truncated file."""
    import soundfile as sf

    declared, got = f.frames, 0
    with f:
        while True:
            try:
                data = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            except sf.LibsndfileError as e:
                raise UnsupportedFormatError(f"cannot decode audio file {path} (corrupt): {e}") from e
            if data.shape[0] == 0:
                break
            got += data.shape[0]
            yield torch.from_numpy(np.ascontiguousarray(data.T))
    if got == 0:
        raise InvalidInputError(f"audio file {path} holds no samples (zero-length recording)")
    if got < declared:
        raise UnsupportedFormatError(
            f"audio file {path} is truncated (read {got} of {declared} frames); re-export or re-download it"
        )


def _pyav_blocks(path: Path, container: Any, declared: float | None, info: dict[str, int]) -> Iterator[Tensor]:
    """Decoded blocks (planar float) of the first audio stream of an open PyAV container (closed at the end).

    The first frame's rate is stored in ``info["rate"]``; later frames are converted to it.
    """
    import av

    resampler = None
    rate, got, pending = 0, 0, []  # codec frames are small: hand them on in blocks of ~_BLOCK_FRAMES // 4

    def flush() -> Tensor:
        block = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
        pending.clear()
        return torch.from_numpy(block.astype(np.float32, copy=False))

    with container:
        try:
            stream = container.streams.audio[0]
            for frame in itertools.chain(container.decode(stream), [None]):
                if frame is None and resampler is None:
                    break
                if resampler is None:
                    rate = info["rate"] = frame.sample_rate
                    resampler = av.AudioResampler(format="fltp", rate=rate)  # keeps the layout
                for out in resampler.resample(frame):
                    got += out.samples
                    arr = out.to_ndarray()
                    if pending and arr.shape[0] != pending[0].shape[0]:  # the channel layout changed
                        yield flush()
                    pending.append(arr)
                    if sum(a.shape[1] for a in pending) >= _BLOCK_FRAMES // 4:
                        yield flush()
        except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
            if isinstance(e, InvalidInputError):
                raise
            raise UnsupportedFormatError(
                f"cannot decode audio file {path} (corrupt or unsupported format): PyAV: {type(e).__name__}: {e}"
            ) from e
    if pending:
        yield flush()
    if got == 0 or rate <= 0:
        raise InvalidInputError(f"audio file {path} decodes to no samples (empty recording)")
    secs = got / rate
    if declared is not None and declared > 0 and secs < 0.9 * declared - 0.1:
        raise UnsupportedFormatError(
            f"audio file {path} looks truncated: decoded {secs:.2f} s of the {declared:.2f} s its header "
            "declares; re-export or re-download it"
        )


def _existing_audio_file(p: Path) -> Path:
    """``p`` if it is a non-empty file, else :class:`InvalidInputError` saying which it is not."""
    if not p.is_file():
        raise InvalidInputError(f"audio file not found: {p}")
    if p.stat().st_size == 0:
        raise InvalidInputError(f"audio file {p} is empty (0 bytes)")
    return p


def _open_audio_stream(path: Path) -> tuple[int, int | None, Iterator[Tensor]]:
    """Open an audio file for streaming → (sample rate, frames if known, ``channels × samples`` blocks).

    Same routing and errors as :func:`load_audio`, raised as the file is read.
    """
    _existing_audio_file(path)
    errors: list[str] = []
    if path.suffix.lower() in _SOUNDFILE_SUFFIXES:
        import soundfile as sf

        trunc = _riff_truncation(path)
        if trunc is not None:
            raise UnsupportedFormatError(f"audio file {path} is truncated ({trunc}); re-export or re-download it")
        try:
            f = sf.SoundFile(str(path))
        except sf.LibsndfileError as e:
            errors.append(f"soundfile: {e}")
        else:
            if f.samplerate <= 0:
                f.close()
                raise UnsupportedFormatError(f"audio file {path} declares a sample rate of {f.samplerate} Hz")
            return int(f.samplerate), int(f.frames), _soundfile_blocks(path, f)
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:  # metadata can be undecodable text
        errors.append(f"PyAV: {type(e).__name__}: {e}")
        raise UnsupportedFormatError(
            f"cannot decode audio file {path} (corrupt or unsupported format): {'; '.join(errors)}"
        ) from e
    try:
        if not container.streams.audio:
            raise UnsupportedFormatError(f"{path} has no audio stream; pass an audio file (wav, flac, mp3, ogg, …)")
        stream = container.streams.audio[0]
        declared = None
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            declared = container.duration / 1e6
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        container.close()
        if isinstance(e, InvalidInputError):
            raise
        raise UnsupportedFormatError(f"cannot read audio file {path}: {type(e).__name__}: {e}") from e
    except BaseException:
        container.close()
        raise
    info: dict[str, int] = {}
    blocks = _pyav_blocks(path, container, declared, info)
    first = next(blocks)  # decodes up to the first frame (its rate is the recording's); raises if there is none
    return info["rate"], None, itertools.chain([first], blocks)



def _to_waveform(x: Any, sample_rate: Any) -> tuple[Tensor, int]:
    """Any accepted input → (float32 ``channels × samples``, rate)."""
    if (
        isinstance(x, tuple)
        and len(x) == 2
        and isinstance(x[0], (np.ndarray, Tensor))
        and sample_rate is None
    ):
        x, sample_rate = x  # torchaudio.load style (waveform, rate)
    if isinstance(x, (str, os.PathLike)):
        wave, rate = load_audio(x)
        if sample_rate is not None:
            logger.debug(
                "sample_rate=%s ignored for a file; the file's own rate %d Hz is used", sample_rate, rate
            )
        return wave, rate
    if isinstance(x, (np.ndarray, Tensor)):
        if sample_rate is None:
            raise InvalidInputError(
                "an audio array/tensor needs its rate: call preprocess(x, sample_rate=...) (in Hz)"
            )
        return _array_to_channels(x), _check_rate(sample_rate)
    if isinstance(x, (list, tuple)):
        if sample_rate is None:
            raise InvalidInputError(
                "an audio sequence needs its rate: call preprocess(x, sample_rate=...) (in Hz)"
            )
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"cannot read audio samples from a {type(x).__name__}: {e}") from e
        return _array_to_channels(arr), _check_rate(sample_rate)
    raise InvalidInputError(
        f"cannot read audio from {type(x).__name__}; pass a file path, or an array/tensor with sample_rate="
    )


# --------------------------------------------------------------------------------------------- adapter


@register_adapter
class AudioAdapter(ModalityAdapter):
    """Audio clips → normalised Kaldi log-mel images ``[pieces, 1, num_mel_bins, frames]``."""

    modality = "audio"
    config_class = AudioConfig

    def __init__(self, config: AudioConfig | None = None) -> None:
        super().__init__(config or AudioConfig())
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        if cfg.sample_rate <= 0 or cfg.num_mel_bins <= 0 or cfg.window_seconds <= 0 or cfg.hop_seconds <= 0:
            raise InvalidInputError(
                "AudioConfig: sample_rate, num_mel_bins, window_seconds, hop_seconds must be > 0"
            )
        if cfg.target_frames is not None and cfg.target_frames <= 0:
            raise InvalidInputError("AudioConfig.target_frames must be positive (or None)")

    @property
    def out_channels(self) -> int:
        return 1

    # --- pieces ---------------------------------------------------------------------------------------

    def waveform(self, x: Any, sample_rate: Any = None) -> Tensor:
        """Decode/convert ``x`` → mono float32 waveform at ``config.sample_rate`` (1-D), validated."""
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        wave, rate = _to_waveform(x, sample_rate)
        if wave.shape[-1] == 0 or wave.shape[0] == 0:
            raise InvalidInputError("empty audio (zero samples); pass at least one sample")
        if not torch.isfinite(wave).all():
            raise InvalidInputError(_NONFINITE)
        mono = _resample(wave.mean(dim=0), rate, cfg.sample_rate)
        if not torch.isfinite(mono).all():
            raise InvalidInputError(_TOO_LOUD)
        return mono.contiguous()

    def window_starts(self, num_samples: int) -> list[int]:
        """Start samples of the sliding windows covering ``num_samples`` (last window aligned to the end)."""
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        win = round(cfg.window_seconds * cfg.sample_rate)
        hop = max(1, round(cfg.hop_seconds * cfg.sample_rate))
        if num_samples <= win:
            return [0]
        n = 1 + math.ceil((num_samples - win) / hop)
        return [min(i * hop, num_samples - win) for i in range(n)]

    def fbank(self, wave: Tensor) -> Tensor:
        """One mono window → raw Kaldi log-mel filterbank ``frames × mel`` (official settings, mean removed)."""
        from torchaudio.compliance import kaldi

        cfg: AudioConfig = self.config  # type: ignore[assignment]
        win = round(cfg.frame_length_ms * cfg.sample_rate / 1000)
        wave = wave - wave.mean()
        if wave.shape[-1] < win:  # shorter than one frame: pad with silence so Kaldi yields one frame
            wave = F.pad(wave, (0, win - wave.shape[-1]))
        return kaldi.fbank(
            wave.unsqueeze(0),
            htk_compat=True,
            sample_frequency=cfg.sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=cfg.num_mel_bins,
            dither=0.0,
            frame_length=cfg.frame_length_ms,
            frame_shift=cfg.frame_shift_ms,
        )

    def preprocess(
        self,
        x: Any,
        *,
        train: bool = False,
        sample_rate: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """One recording → ``[windows, 1, num_mel_bins, frames]`` (normalised; SpecAugment when ``train``).

        ``x``: a file path, a ``(waveform, rate)`` pair, or an array/tensor (1-D, or 2-D with the shorter
        axis as channels) with ``sample_rate=`` in Hz. Integer PCM is scaled to [-1, 1).
        """
        if kwargs:
            raise InvalidInputError(f"unexpected keyword argument(s) for audio preprocess: {sorted(kwargs)}")
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        if isinstance(x, (str, os.PathLike)):  # a file: decoded, resampled and cut as a stream
            if sample_rate is not None:
                logger.debug("sample_rate=%s ignored for a file; the file's own rate is used", sample_rate)
            rate, frames_known, blocks = _open_audio_stream(Path(x))
            samples = _mono_stream(blocks, rate, cfg.sample_rate)
            length = None if frames_known is None else _resampled_length(frames_known, rate, cfg.sample_rate)
        else:
            mono = self.waveform(x, sample_rate)
            samples, length = iter([mono]), mono.shape[-1]
        win = round(cfg.window_seconds * cfg.sample_rate)
        hop = max(1, round(cfg.hop_seconds * cfg.sample_rate))
        frames = cfg.num_frames()
        expected = len(self.window_starts(length)) if length else 0
        out = torch.empty(expected, 1, cfg.num_mel_bins, frames)  # filled in place: no second copy
        extra: list[Tensor] = []  # windows beyond ``expected`` (a length that was not known ahead)
        done = 0
        cutter = _WindowCutter(win, hop)
        for block in itertools.chain(samples, [None]):
            for window in cutter.push(block) if block is not None else cutter.finish():
                image = self._image(window, train, generator)
                if done < expected:
                    out[done] = image
                else:
                    extra.append(image)
                done += 1
        if done == 0:
            raise InvalidInputError("empty audio (zero samples); pass at least one sample")
        if extra:
            out = torch.cat([out, torch.stack(extra)])
        return out[:done]

    def _image(self, window: Tensor, train: bool, generator: torch.Generator | None) -> Tensor:
        """One window of samples → one normalised ``1 × mel × frames`` image (augmented when ``train``)."""
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        frames = cfg.num_frames()
        fb = self.fbank(window)
        fb = fb[:frames]
        if cfg.mean_norm:  # per-bin mean over the real frames (before any padding), back at the global mean
            fb = fb - fb.mean(0, keepdim=True) + cfg.norm_mean
        if fb.shape[0] < frames:  # official: zero-pad the log-mel frames at the end
            fb = F.pad(fb, (0, 0, 0, frames - fb.shape[0]))
        if train:
            fb = self._mask(fb, generator)
        fb = (fb - cfg.norm_mean) / (2 * cfg.norm_std)
        if train and cfg.noise:
            fb = self._noise(fb, generator)
        if not torch.isfinite(fb).all():
            raise InvalidInputError(_TOO_LOUD)
        return fb.t().unsqueeze(0)  # 1 × mel (H) × time (W)

    # --- augmentation (official AST recipe, reproducible through ``generator``) ---------------------------

    def _mask(self, fb: Tensor, g: torch.Generator | None) -> Tensor:
        """SpecAugment: one frequency and one time mask (zeros in the log-mel domain), widths U[0, param)."""
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        fb = fb.clone()
        for axis, param in ((1, cfg.freq_mask), (0, cfg.time_mask)):
            size = fb.shape[axis]
            if param <= 0:
                continue
            width = int(torch.rand((), generator=g) * min(param, size))
            lo = int(torch.rand((), generator=g) * (size - width))
            fb.narrow(axis, lo, width).zero_()
        return fb

    def _noise(self, fb: Tensor, g: torch.Generator | None) -> Tensor:
        """Official "noise": add U[0,1) · U[0,1) / 10 and roll along time by an integer in [-roll, roll)."""
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        fb = fb + torch.rand(fb.shape, generator=g) * torch.rand((), generator=g) / 10
        if cfg.roll > 0:
            shift = int(torch.randint(-cfg.roll, cfg.roll, (), generator=g))
            fb = torch.roll(fb, shift, 0)
        return fb

    def forward(self, batch: Tensor) -> Tensor:
        """Identity on ``[B, 1, mel, frames]`` (validated)."""
        cfg: AudioConfig = self.config  # type: ignore[assignment]
        if batch.dim() != 4 or batch.shape[1] != 1 or batch.shape[2] != cfg.num_mel_bins:
            raise InvalidInputError(
                f"audio batch must be B×1×{cfg.num_mel_bins}×frames (stack preprocess outputs), got {tuple(batch.shape)}"
            )
        return batch
