"""A Kinetics-style video-folder loader (``root/<class>/<clip>.{mp4,avi,mkv,webm}``) decoding with PyAV."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InvalidInputError, UnsupportedFormatError
from ._common import check_positive_int

__all__ = ["VIDEO_EXTENSIONS", "VideoFolder", "read_video_frames", "uniform_indices"]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm")


def uniform_indices(num_available: int, num_frames: int) -> np.ndarray:
    """``num_frames`` frame indices spread uniformly over ``num_available`` frames (centres of equal segments).

    Clips shorter than ``num_frames`` repeat frames (each index appears in order, none is skipped).
    """
    if num_available < 1:
        raise InvalidInputError("cannot sample frames from a clip with no frames")
    check_positive_int(num_frames, "num_frames")
    return np.minimum(
        ((np.arange(num_frames) + 0.5) * num_available / num_frames).astype(np.int64), num_available - 1
    )


def _open_video(path: Path) -> Any:
    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise UnsupportedFormatError(f"{path}: no video stream")
    return container


def _frame_count(path: Path) -> int:
    """Frames announced by the container, else the number of video packets (demuxed, not decoded)."""
    with _open_video(path) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for p in container.demux(stream) if p.size > 0)


def _decode(path: Path, wanted: set[int] | None, kwargs: dict[str, Any]) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame, converting those in ``wanted`` (all if ``None``); return them and the frame count."""
    out: dict[int, np.ndarray] = {}
    count = 0
    with _open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None or i in wanted:
                out[i] = frame.to_ndarray(**kwargs)
            count = i + 1
    return out, count


def read_video_frames(
    path: str | os.PathLike[str],
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode a video file with PyAV into RGB frames: uint8 ``[T, H, W, 3]``.

    Args:
        path: any container/codec FFmpeg (bundled with PyAV) can decode.
        num_frames: if given, pick exactly this many frames uniformly over the clip (:func:`uniform_indices`);
            otherwise every frame.
        size: optional ``(height, width)`` to resize to while converting (FFmpeg's swscale).

    Raises:
        UnsupportedFormatError: the file cannot be opened or has no video stream.
        InvalidInputError: the file does not exist or decodes to no frames.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such video file")
    kwargs: dict[str, Any] = {"format": "rgb24"}
    if size is not None:
        kwargs.update(height=int(size[0]), width=int(size[1]))
    try:
        if num_frames is None:
            frames, count = _decode(path, None, kwargs)
            idx = np.arange(count)
        else:
            check_positive_int(num_frames, "num_frames")
            # Pick the frames from the container's frame count (or a packet count), decoding once; if the
            # estimate was wrong (some AVI/MKV headers), decode again with the true count.
            estimate = _frame_count(path)
            frames, count = _decode(path, set(uniform_indices(max(estimate, 1), num_frames).tolist()), kwargs)
            if count != estimate and count > 0:
                logger.debug("%s: %d frames decoded, %d announced; re-sampling", path, count, estimate)
                frames, count = _decode(path, set(uniform_indices(count, num_frames).tolist()), kwargs)
            idx = uniform_indices(max(count, 1), num_frames)
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise UnsupportedFormatError(f"{path}: cannot decode video ({e})") from e
    if count == 0:
        raise InvalidInputError(f"{path}: the video stream decodes to no frames")
    out = [frames[i] for i in idx.tolist()]
    return np.stack(out)


class VideoFolder(Dataset):
    """Video clips in class folders: ``(frames uint8 tensor [T, H, W, 3], label_index)``.

    Args:
        root: folder with one sub-folder per class (e.g. one split of Kinetics: ``root = kinetics/train``).
        num_frames: frames per sample, spread uniformly over each clip (short clips repeat frames).
        size: optional ``(height, width)`` to resize every frame to (needed to batch clips of mixed sizes).
        extensions: file extensions to pick up.
        transform: applied to the frames tensor; ``target_transform`` to the label index.

    Attributes: ``classes`` (sorted folder names), ``samples`` (list of ``(path, label_index)``), ``targets``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        num_frames: int = 16,
        size: tuple[int, int] | None = None,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise InvalidInputError(f"video folder root {self.root} is not a directory")
        self.num_frames = check_positive_int(num_frames, "num_frames")
        self.size = size
        exts = tuple(e.lower() for e in extensions)
        self.classes: tuple[str, ...] = tuple(
            sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        )
        if not self.classes:
            raise InvalidInputError(f"no class folders under {self.root} (expected root/<class>/<clip>.mp4)")
        self.samples: list[tuple[Path, int]] = [
            (f, label)
            for label, c in enumerate(self.classes)
            for f in sorted((self.root / c).iterdir())
            if f.is_file() and f.suffix.lower() in exts
        ]
        if not self.samples:
            raise InvalidInputError(f"no {'/'.join(exts)} files under {self.root}/<class>/")
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, label = self.samples[index]
        x: Any = torch.from_numpy(read_video_frames(path, self.num_frames, self.size))
        y: Any = label
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    def __repr__(self) -> str:
        return f"VideoFolder(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)})"
