"""Moving sprites: short videos of one sprite moving in one of eight directions, stored as real MP4 files.

A sprite (circle, square, triangle, diamond, cross or ring; random saturated colour, radius and speed) moves in a
straight line across ``num_frames`` frames of a ``size x size`` canvas without leaving it. The background is a
random dark colour with a gentle gradient, optional static clutter (dimmer shapes) and per-frame Gaussian noise.
Clips are encoded with PyAV (libx264, yuv420p, ``crf`` 18; one thread, explicit timestamps and no mbtree so the
bytes are reproducible) into the cache on first use (atomically) and decoded back with PyAV.
"""

from __future__ import annotations

import colorsys
import csv
import logging
import os
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from ._common import check_positive_int, dataset_root, ensure_generated, params_key, split_code, write_json
from .video_folder import read_video_frames

__all__ = ["DIRECTIONS", "SPRITE_SHAPES", "MovingSprites", "render_sprite_clip", "write_mp4"]

logger = logging.getLogger(__name__)

#: Label names, in label-index order.
DIRECTIONS: tuple[str, ...] = (
    "up",
    "down",
    "left",
    "right",
    "up-left",
    "up-right",
    "down-left",
    "down-right",
)
#: Unit motion vectors ``(dx, dy)`` in image coordinates (``y`` grows downwards).
_VECTORS: dict[str, tuple[float, float]] = {
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up-left": (-(0.5**0.5), -(0.5**0.5)),
    "up-right": (0.5**0.5, -(0.5**0.5)),
    "down-left": (-(0.5**0.5), 0.5**0.5),
    "down-right": (0.5**0.5, 0.5**0.5),
}
SPRITE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
DEFAULT_NUM_PER_CLASS = {"train": 50, "val": 10, "test": 10, "all": 50}
_MARKER = "manifest.csv"
_VERSION = 2


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) of a sprite centred at the origin."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) / 2**0.5 - 0.8 * r
    if shape == "triangle":  # apex up
        s, c = np.sin(np.pi / 3), np.cos(np.pi / 3)
        return np.maximum.reduce([dy, -s * dx - c * dy, s * dx - c * dy]) - 0.5 * r
    if shape == "cross":
        a, b = np.abs(dx), np.abs(dy)
        return np.minimum(np.maximum(a - r, b - 0.35 * r), np.maximum(a - 0.35 * r, b - r))
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.7 * r) - 0.3 * r
    raise InvalidInputError(f"unknown sprite shape {shape!r}; choose one of {SPRITE_SHAPES}")


def _alpha(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.clip(0.5 - _sdf(shape, xx - cx, yy - cy, r), 0.0, 1.0)[..., None]


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val)))


def _check_shapes(shapes: Any) -> tuple[str, ...]:
    shapes = (shapes,) if isinstance(shapes, str) else tuple(shapes)
    bad = [s for s in shapes if s not in SPRITE_SHAPES]
    if not shapes or bad:
        raise InvalidInputError(f"sprite_shapes must be a non-empty subset of {SPRITE_SHAPES}, got {shapes}")
    return shapes


def render_sprite_clip(
    direction: str,
    rng: np.random.Generator | int | None = None,
    *,
    num_frames: int = 16,
    size: int = 64,
    speed_range: tuple[float, float] = (1.5, 3.0),
    radius_range: tuple[float, float] = (4.0, 8.0),
    clutter: bool = True,
    noise_std: float = 6.0,
    sprite_shapes: tuple[str, ...] = SPRITE_SHAPES,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Render one clip: uint8 frames ``[num_frames, size, size, 3]`` and its parameters (start, velocity, ...).

    The sprite and the clutter are drawn from ``sprite_shapes`` (hold some out to test on sprites never seen).
    """
    if direction not in _VECTORS:
        raise InvalidInputError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")
    sprite_shapes = _check_shapes(sprite_shapes)
    check_positive_int(num_frames, "num_frames")
    check_positive_int(size, "size")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    ux, uy = _VECTORS[direction]
    shape = str(sprite_shapes[rng.integers(len(sprite_shapes))])
    r = float(rng.uniform(*radius_range))
    margin = r + 1.0
    room = size - 2 * margin
    speed = float(rng.uniform(*speed_range))
    if num_frames > 1:  # keep the whole path on the canvas
        speed = min(speed, room / ((num_frames - 1) * max(abs(ux), abs(uy))))
    vx, vy = speed * ux, speed * uy
    span_x, span_y = vx * (num_frames - 1), vy * (num_frames - 1)
    x0 = float(rng.uniform(margin - min(span_x, 0), size - margin - max(span_x, 0)))
    y0 = float(rng.uniform(margin - min(span_y, 0), size - margin - max(span_y, 0)))
    colour = _colour(rng, (0.6, 1.0), (0.75, 1.0))
    # background: dark colour + linear gradient + static clutter
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = _colour(rng, (0.0, 0.6), (0.05, 0.3))
    grad = rng.uniform(-25, 25, size=2)
    bg = base + (grad[0] * (xx - 0.5) + grad[1] * (yy - 0.5))[..., None]
    n_clutter = int(rng.integers(0, 7)) if clutter else 0
    for _ in range(n_clutter):
        c_shape = str(sprite_shapes[rng.integers(len(sprite_shapes))])
        a = _alpha(c_shape, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 7), size, size)
        bg = bg * (1 - 0.6 * a) + 0.6 * a * _colour(rng, (0.0, 0.5), (0.2, 0.5))
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        a = _alpha(shape, x0 + vx * t, y0 + vy * t, r, size, size)
        img = bg * (1 - a) + colour * a
        if noise_std > 0:
            img = img + rng.normal(0, noise_std, size=img.shape)
        frames[t] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    meta = {
        "direction": direction, "shape": shape, "radius": round(r, 4), "x0": round(x0, 4), "y0": round(y0, 4),
        "vx": round(vx, 4), "vy": round(vy, 4), "colour": "#" + "".join(f"{round(c):02x}" for c in colour),
        "clutter": n_clutter,
    }  # fmt: skip
    return frames, meta


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` (even ``H``, ``W``) as H.264/yuv420p MP4 with PyAV."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidInputError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise InvalidInputError(
            f"need at least one frame and even height/width for yuv420p, got {frames.shape}"
        )
    with av.open(str(path), "w", format="mp4") as container:
        # One thread and no macroblock-tree rate control: with mbtree, x264 output varies between runs on identical
        # input (measured with PyAV 18.1 / x264 core 165), which would break byte-identical regeneration.
        options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            # explicit timestamps: without them x264's rate control sees arbitrary frame times and the
            # output bytes vary from run to run
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


_FIELDS = (
    "file",
    "label",
    "label_index",
    "direction",
    "shape",
    "radius",
    "x0",
    "y0",
    "vx",
    "vy",
    "colour",
    "clutter",
)


class MovingSprites(Dataset):
    """Moving-sprite clips: ``(frames uint8 tensor [num_frames, size, size, 3], label_index)``.

    Args:
        root: parent folder of generated datasets (default ``cache_dir()/datasets/sprites``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (independent random streams).
        num_per_class: clips per direction (default 50 for train/all, 10 for val/test).
        num_frames, size, fps: clip geometry (``size`` must be even).
        seed: seed of every random choice; the same parameters give byte-identical MP4 files.
        speed_range: pixels per frame; radius_range: sprite radius in pixels.
        clutter: static distractor shapes in the background; noise_std: per-frame Gaussian pixel noise.
        sprite_shapes: the shapes sprites (and clutter) are drawn from; train on some and test on the others
            to measure generalisation to sprites never seen.
        progress: show a tqdm progress bar while generating.
        transform: applied to the frames tensor; ``target_transform`` to the label index.

    Attributes: ``classes`` (:data:`DIRECTIONS`), ``samples`` (manifest rows: start, velocity, shape, colour),
    ``targets``, ``path``.
    """

    classes: tuple[str, ...] = DIRECTIONS

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        num_per_class: int | None = None,
        seed: int = 0,
        *,
        num_frames: int = 16,
        size: int = 64,
        fps: int = 8,
        speed_range: tuple[float, float] = (1.5, 3.0),
        radius_range: tuple[float, float] = (4.0, 8.0),
        clutter: bool = True,
        noise_std: float = 6.0,
        sprite_shapes: tuple[str, ...] = SPRITE_SHAPES,
        crf: int = 18,
        progress: bool = True,
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        code = split_code(split)
        num_per_class = check_positive_int(
            DEFAULT_NUM_PER_CLASS[split] if num_per_class is None else num_per_class, "num_per_class"
        )
        check_positive_int(num_frames, "num_frames")
        if check_positive_int(size, "size") % 2:
            raise InvalidInputError(f"size must be even (yuv420p), got {size}")
        if 2 * (radius_range[1] + 1) >= size:
            raise InvalidInputError(f"radius_range {radius_range} too large for a {size}x{size} canvas")
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        render_opts: dict[str, Any] = {
            "num_frames": num_frames, "size": size, "speed_range": list(speed_range),
            "radius_range": list(radius_range), "clutter": clutter, "noise_std": noise_std,
        }  # fmt: skip
        shapes = _check_shapes(sprite_shapes)
        if shapes != SPRITE_SHAPES:  # only then: the default keeps its cache folder name
            render_opts["sprite_shapes"] = list(shapes)
        params = {
            "version": _VERSION, "split": split, "num_per_class": num_per_class, "seed": seed, "fps": fps,
            "crf": crf, "av": av.__version__, **render_opts,
        }  # fmt: skip
        name = f"{split}-{num_per_class}pc-seed{seed}-{params_key(params)}"
        self.path = dataset_root(root, "sprites") / name

        def generate(out: Path) -> None:
            t0 = time.perf_counter()
            rows = []
            n = num_per_class * len(DIRECTIONS)
            for i in tqdm(range(n), desc=f"sprites[{split}]", unit="clip", disable=not progress):
                label = i % len(DIRECTIONS)
                rng = np.random.default_rng([seed, code, i])
                frames, meta = render_sprite_clip(DIRECTIONS[label], rng, **{
                    **render_opts, "speed_range": tuple(speed_range), "radius_range": tuple(radius_range),
                    "sprite_shapes": shapes})  # fmt: skip
                rel = Path(DIRECTIONS[label]) / f"{split}-{i:06d}.mp4"
                (out / rel).parent.mkdir(exist_ok=True)
                write_mp4(out / rel, frames, fps=fps, crf=crf)
                rows.append(
                    {"file": rel.as_posix(), "label": DIRECTIONS[label], "label_index": label, **meta}
                )
            write_json(out / "params.json", params)
            with open(out / (_MARKER + ".part"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=_FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            os.replace(out / (_MARKER + ".part"), out / _MARKER)
            logger.info("generated %d sprite clips in %.1f s", n, time.perf_counter() - t0)

        ensure_generated(self.path, _MARKER, generate)
        with open(self.path / _MARKER, newline="") as f:
            self.samples: list[dict[str, Any]] = list(csv.DictReader(f))
        for row in self.samples:
            row["label_index"] = int(row["label_index"])
        self.targets = [row["label_index"] for row in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        row = self.samples[index]
        x: Any = torch.from_numpy(read_video_frames(self.path / row["file"]))
        y: Any = row["label_index"]
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    def __repr__(self) -> str:
        return f"MovingSprites(split={self.split!r}, n={len(self)}, path={str(self.path)!r})"
