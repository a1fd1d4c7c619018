"""Video adapter: file or ``T×H×W×3`` frames → normalised clips ``[pieces, 3, T, S, S]`` → images.

Processor: sample ``num_frames`` frames (uniform segments over the whole video by default, or the official
fixed stride), resize the shorter side, crop ``size × size`` (centre, or 3 crops along the long side as the
official test protocol), normalise with ImageNet mean/std. Files are decoded with PyAV as a stream: only the
sampled frames are converted and kept (already resized), decoding stops after the last one.

Embedding (``layout``):

* ``"tile"`` (default): the frames tiled into a near-square grid of images (frame ``t`` at row ``t // cols``,
  column ``t % cols``, empty cells zero) → ``B × 3 × (rows·S) × (cols·S)``. Neighbouring pixels in the image
  are neighbouring pixels of one frame, so the 2-D kernels see real spatial structure.
* ``"official"``: the official raw reshape ``B×3×T×H×W → B×3×(H·r)×(W·r)`` with ``r = √T`` (``r = 4`` for the
  official T = 16). It is *not* a mosaic: in memory order frame ``t`` fills image rows ``t·H/r … (t+1)·H/r − 1``
  and each image row holds ``r`` consecutive source rows side by side. Kept for checkpoint compatibility.
* ``"channels"``: frames stacked on the channel axis (frame-major: channel ``3·t + c``) → ``B × 3T × S × S``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidInputError, UnsupportedFormatError
from .base import AdapterConfig, ModalityAdapter, register_adapter

__all__ = [
    "VIDEO_LAYOUTS",
    "VideoAdapter",
    "VideoConfig",
    "read_video_frames",
    "sample_frame_indices",
    "tile_grid",
]

logger = logging.getLogger(__name__)

VIDEO_LAYOUTS = ("tile", "official", "channels")


@dataclasses.dataclass
class VideoConfig(AdapterConfig):
    """Preprocessing and layout of the video adapter (saved in bundles).

    ``frame_stride=0`` samples ``num_frames`` uniform segments over the whole video (TSN style); ``> 0``
    takes consecutive frames ``frame_stride`` apart (official: 16 frames, stride 4). ``short_side=None`` resizes
    the shorter side to ``size``. Evaluation scores ``num_clips × num_crops`` pieces per video.
    """

    num_frames: int = 8
    size: int = 64
    short_side: int | None = None
    frame_stride: int = 0
    num_clips: int = 1
    num_crops: int = 1
    layout: str = "tile"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # train=True augmentation: random resized crop (area fraction, aspect ratio) and horizontal flip
    train_scale: tuple[float, float] = (0.08, 1.0)
    train_ratio: tuple[float, float] = (0.75, 1.3333333)
    flip: bool = True

    @classmethod
    def official(cls) -> VideoConfig:
        """Official Kinetics-400 setting: 16 frames stride 4 at 224², raw reshape, 5 clips × 3 crops at test."""
        return cls(num_frames=16, size=224, frame_stride=4, num_clips=5, num_crops=3, layout="official")


def tile_grid(t: int) -> tuple[int, int]:
    """(rows, cols) of the ``"tile"`` layout: the most square exact factorisation with aspect ≤ 2, else a
    ``ceil(√T)``-wide grid with empty cells at the end."""
    for rows in range(math.isqrt(t), 0, -1):
        if t % rows == 0 and t // rows <= 2 * rows:
            return rows, t // rows
    cols = math.ceil(math.sqrt(t))
    return math.ceil(t / cols), cols


def sample_frame_indices(
    n: int, cfg: VideoConfig, *, train: bool = False, generator: torch.Generator | None = None
) -> list[list[int]]:
    """Frame indices of each temporal clip (one clip when ``train``); clips shorter than needed repeat frames."""
    if n <= 0:
        raise InvalidInputError("the video has no frames")
    t = cfg.num_frames
    clips = 1 if train else cfg.num_clips
    out: list[list[int]] = []
    if cfg.frame_stride <= 0:  # uniform segments: frame i from segment [i·n/T, (i+1)·n/T)
        for k in range(clips):
            if train:
                offs = torch.rand(t, generator=generator).tolist()
            else:
                offs = [(k + 0.5) / clips] * t
            out.append([min(n - 1, int((i + offs[i]) * n / t)) for i in range(t)])
        return out
    span = (t - 1) * cfg.frame_stride + 1
    room = max(0, n - span)
    for k in range(clips):
        if train:
            start = int(torch.randint(0, room + 1, (), generator=generator))
        elif clips == 1:
            start = room // 2
        else:
            start = round(k * room / (clips - 1))
        out.append([min(n - 1, start + i * cfg.frame_stride) for i in range(t)])
    return out


def _resize_short(frame: Tensor, short: int) -> Tensor:
    """``3×H×W`` (or ``T×3×H×W``) float → shorter side ``short`` (bilinear, antialiased)."""
    h, w = frame.shape[-2:]
    scale = short / min(h, w)
    nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
    if (nh, nw) == (h, w):
        return frame
    squeeze = frame.dim() == 3
    x = frame.unsqueeze(0) if squeeze else frame
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x[0] if squeeze else x


def _count_frames(path: Path) -> int:
    """Frames in the first video stream: the container's count, else the number of video packets (no decoding)."""
    import av

    with av.open(str(path)) as c:
        if not c.streams.video:
            raise UnsupportedFormatError(
                f"{path} has no video stream; pass a video file (mp4, avi, mkv, webm, …)"
            )
        s = c.streams.video[0]
        if s.frames and s.frames > 0:
            return int(s.frames)
        return sum(1 for pkt in c.demux(s) if pkt.size)


def read_video_frames(path: str | os.PathLike[str], indices: list[int], short_side: int) -> dict[int, Tensor]:
    """Stream-decode ``path`` keeping only frames ``indices`` (float ``3×H×W`` in [0, 1], shorter side resized).

    Indices past the real end (a container that over-reports its length) map to the last decoded frame.
    """
    import av

    p = Path(path)
    wanted = set(indices)
    last_needed = max(indices)
    kept: dict[int, Tensor] = {}
    last_frame = None
    last_idx = -1
    size: tuple[int, int] | None = None  # every kept frame gets the first kept frame's size

    def convert(frame: Any) -> Tensor:
        nonlocal size
        rgb = _resize_short(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255.0,
                            short_side)
        if size is None:
            size = (rgb.shape[-2], rgb.shape[-1])
        elif tuple(rgb.shape[-2:]) != size:  # the stream changed resolution mid-way
            rgb = F.interpolate(rgb[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return rgb

    with av.open(str(p)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(s)):
            last_frame, last_idx = frame, i
            if i in wanted:
                kept[i] = convert(frame)
            if i >= last_needed:
                break
    if last_frame is None:
        raise InvalidInputError(f"video file {p} decodes to zero frames")
    missing = sorted(wanted - kept.keys())
    if missing:
        logger.warning(
            "video %s has %d frames, fewer than its header says; repeating the last frame", p, last_idx + 1
        )
        tail = convert(last_frame)
        for i in missing:
            kept[i] = tail
    return kept


def _frames_from_array(x: np.ndarray | Tensor) -> Tensor:
    """``T×H×W×3`` uint8 (or float in [0, 1]) array/tensor → float ``T×3×H×W`` in [0, 1], validated."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach().cpu()
    if t.dim() != 4 or t.shape[-1] != 3:
        hint = (
            " (it looks like T×3×H×W: permute(0, 2, 3, 1) first)" if t.dim() == 4 and t.shape[1] == 3 else ""
        )
        raise InvalidInputError(f"video frames must be T×H×W×3 (RGB), got shape {tuple(t.shape)}{hint}")
    if t.shape[0] == 0:
        raise InvalidInputError("the video has zero frames")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise InvalidInputError(f"video frames are empty (shape {tuple(t.shape)})")
    if t.dtype == torch.uint8:
        f = t.float() / 255.0
    elif t.is_floating_point():
        f = t.float()
        if not torch.isfinite(f).all():
            raise InvalidInputError("video frames contain NaN or Inf values")
        if f.min() < 0 or f.max() > 1:
            raise InvalidInputError(
                "float video frames must lie in [0, 1]; pass uint8 frames or divide by 255"
            )
    else:
        raise InvalidInputError(f"video frames must be uint8 or float in [0, 1], got dtype {t.dtype}")
    return f.permute(0, 3, 1, 2).contiguous()


@register_adapter
class VideoAdapter(ModalityAdapter):
    """Video clips → ``[pieces, 3, T, S, S]`` (processor) → images in the chosen ``layout`` (embedding)."""

    modality = "video"
    config_class = VideoConfig

    def __init__(self, config: VideoConfig | None = None) -> None:
        super().__init__(config or VideoConfig())
        cfg: VideoConfig = self.config  # type: ignore[assignment]
        if cfg.layout not in VIDEO_LAYOUTS:
            raise InvalidInputError(f"unknown video layout {cfg.layout!r}; choose from {VIDEO_LAYOUTS}")
        if cfg.num_frames <= 0 or cfg.size <= 0 or cfg.num_clips <= 0 or cfg.num_crops not in (1, 3):
            raise InvalidInputError(
                "VideoConfig: num_frames, size, num_clips must be > 0 and num_crops 1 or 3"
            )
        if cfg.layout == "official" and math.isqrt(cfg.num_frames) ** 2 != cfg.num_frames:
            raise InvalidInputError(
                f"the official layout reshapes T frames into a √T-times larger image and needs a square T "
                f"(official 16), got num_frames={cfg.num_frames}; use layout='tile' or num_frames=16"
            )

    @property
    def out_channels(self) -> int:
        cfg: VideoConfig = self.config  # type: ignore[assignment]
        return 3 * cfg.num_frames if cfg.layout == "channels" else 3

    def preprocess(
        self, x: Any, *, train: bool = False, generator: torch.Generator | None = None, **kwargs: Any
    ) -> Tensor:
        """One video (path or ``T×H×W×3`` frames) → normalised ``[clips·crops, 3, T, size, size]``.

        ``train=True`` returns one randomly placed clip with a random resized crop and horizontal flip.
        """
        if kwargs:
            raise InvalidInputError(f"unexpected keyword argument(s) for video preprocess: {sorted(kwargs)}")
        cfg: VideoConfig = self.config  # type: ignore[assignment]
        short = cfg.short_side or cfg.size
        if train:  # keep enough pixels for a random resized crop at the target size
            short = max(short, cfg.size)
        if isinstance(x, (str, os.PathLike)):
            clips = self._clips_from_file(Path(x), short, train, generator)
        elif isinstance(x, (np.ndarray, Tensor)):
            frames = _frames_from_array(x)
            idx = sample_frame_indices(frames.shape[0], cfg, train=train, generator=generator)
            clips = [_resize_short(frames[i], short) for i in idx]
        else:
            raise InvalidInputError(
                f"cannot read a video from {type(x).__name__}; pass a path or T×H×W×3 frames"
            )
        pieces = []
        for clip in clips:  # clip: T×3×H×W
            if train:
                pieces.append(self._random_crop(clip, generator))
            else:
                pieces.extend(self._crops(clip))
        out = torch.stack(pieces)  # P×T×3×S×S
        mean = torch.tensor(cfg.mean).view(1, 1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 1, 3, 1, 1)
        return ((out - mean) / std).permute(0, 2, 1, 3, 4).contiguous()

    def _clips_from_file(
        self, path: Path, short: int, train: bool, generator: torch.Generator | None
    ) -> list[Tensor]:
        import av

        cfg: VideoConfig = self.config  # type: ignore[assignment]
        if not path.is_file():
            raise InvalidInputError(f"video file not found: {path}")
        try:
            n = _count_frames(path)
            if n <= 0:
                raise InvalidInputError(f"video file {path} has zero frames")
            idx = sample_frame_indices(n, cfg, train=train, generator=generator)
            kept = read_video_frames(path, sorted({i for clip in idx for i in clip}), short)
        except av.error.FFmpegError as e:
            raise UnsupportedFormatError(
                f"cannot decode video file {path} (corrupt or unsupported format): {e}"
            ) from e
        except InvalidInputError:
            raise
        except Exception as e:  # PyAV also fails with UnicodeDecodeError (metadata), ValueError, …
            raise UnsupportedFormatError(
                f"cannot decode video file {path} (corrupt or unsupported format): {type(e).__name__}: {e}"
            ) from e
        return [torch.stack([kept[i] for i in clip]) for clip in idx]

    def _crops(self, clip: Tensor) -> list[Tensor]:
        """Centre crop, or (``num_crops=3``) start/centre/end crops along the longer side."""
        cfg: VideoConfig = self.config  # type: ignore[assignment]
        s = cfg.size
        clip = _resize_short(clip, s) if min(clip.shape[-2:]) < s else clip
        h, w = clip.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        if cfg.num_crops == 1:
            return [clip[..., top : top + s, left : left + s]]
        if w >= h:
            return [clip[..., top : top + s, x : x + s] for x in (0, left, w - s)]
        return [clip[..., y : y + s, left : left + s] for y in (0, top, h - s)]

    def _random_crop(self, clip: Tensor, g: torch.Generator | None) -> Tensor:
        """Random resized crop (same box for every frame) + horizontal flip, to ``size × size``."""
        cfg: VideoConfig = self.config  # type: ignore[assignment]
        h, w = clip.shape[-2:]
        area = h * w
        box = (0, 0, h, w)
        for _ in range(10):
            a = area * (
                cfg.train_scale[0]
                + (cfg.train_scale[1] - cfg.train_scale[0]) * float(torch.rand((), generator=g))
            )
            lr = math.log(cfg.train_ratio[0]), math.log(cfg.train_ratio[1])
            r = math.exp(lr[0] + (lr[1] - lr[0]) * float(torch.rand((), generator=g)))
            cw, ch = round(math.sqrt(a * r)), round(math.sqrt(a / r))
            if 0 < cw <= w and 0 < ch <= h:
                y = int(torch.randint(0, h - ch + 1, (), generator=g))
                x = int(torch.randint(0, w - cw + 1, (), generator=g))
                box = (y, x, ch, cw)
                break
        y, x, ch, cw = box
        crop = clip[..., y : y + ch, x : x + cw]
        crop = F.interpolate(
            crop, size=(cfg.size, cfg.size), mode="bilinear", antialias=True, align_corners=False
        )
        if cfg.flip and float(torch.rand((), generator=g)) < 0.5:
            crop = crop.flip(-1)
        return crop

    def forward(self, batch: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` → the ``layout`` image batch (see the module docstring)."""
        cfg: VideoConfig = self.config  # type: ignore[assignment]
        if batch.dim() != 5 or batch.shape[1] != 3 or batch.shape[2] != cfg.num_frames:
            raise InvalidInputError(
                f"video batch must be B×3×{cfg.num_frames}×H×W (stack preprocess outputs), got {tuple(batch.shape)}"
            )
        b, c, t, h, w = batch.shape
        if cfg.layout == "official":
            r = math.isqrt(t)
            return batch.reshape(b, c, h * r, w * r)
        if cfg.layout == "channels":
            return batch.permute(0, 2, 1, 3, 4).reshape(b, t * c, h, w)
        rows, cols = tile_grid(t)
        if rows * cols > t:
            batch = F.pad(batch, (0, 0, 0, 0, 0, rows * cols - t))
        grid = batch.reshape(b, c, rows, cols, h, w).permute(0, 1, 2, 4, 3, 5)
        return grid.reshape(b, c, rows * h, cols * w)
