"""A loader for the real Speech Commands (v0.02 / v0.01) directory layout.

``root/<word>/<speaker>_nohash_<n>.wav`` plus ``validation_list.txt`` and ``testing_list.txt`` (paths relative to
``root``, one per line). ``train`` is every clip in neither list; ``_background_noise_`` is never a class.
WAV files are read with ``soundfile`` (no torchaudio I/O).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from ..errors import InvalidInputError, UnsupportedFormatError

__all__ = ["SPEECH_COMMANDS_V2_LABELS", "SpeechCommands"]

logger = logging.getLogger(__name__)

#: The 35 words of Speech Commands v0.02, sorted.
SPEECH_COMMANDS_V2_LABELS: tuple[str, ...] = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go", "happy",
    "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven", "sheila", "six", "stop",
    "three", "tree", "two", "up", "visual", "wow", "yes", "zero",
)  # fmt: skip
UNKNOWN = "_unknown_"


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise InvalidInputError(
            f"{path} not found: a Speech Commands root needs validation_list.txt and testing_list.txt "
            "(the official archive ships both)"
        )
    return {line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


class SpeechCommands(Dataset):
    """Speech Commands clips: ``(waveform float32 [1, n], sample_rate, label_index)``.

    Args:
        root: the extracted archive (folders per word, the two list files).
        split: ``"train"``, ``"val"`` (``validation_list.txt``) or ``"test"`` (``testing_list.txt``).
        labels: ``None`` for every word folder present (the 35 words of v0.02, sorted); or a subset such as
            the ten keywords, in which case other words map to a final ``_unknown_`` class.
        transform: applied to the waveform tensor; ``target_transform`` to the label index.

    Attributes: ``classes``, ``samples`` (list of ``(relative path, label_index, speaker)``), ``targets``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        labels: Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if split not in ("train", "val", "test"):
            raise InvalidInputError(f"unknown split {split!r}; choose 'train', 'val' or 'test'")
        if not self.root.is_dir():
            raise InvalidInputError(f"Speech Commands root {self.root} is not a directory")
        val = _read_list(self.root / "validation_list.txt")
        test = _read_list(self.root / "testing_list.txt")
        words = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
        )
        if not words:
            raise InvalidInputError(f"no word folders found under {self.root}")
        if labels is None:
            self.classes: tuple[str, ...] = tuple(words)
            mapping = {w: i for i, w in enumerate(words)}
        else:
            labels = list(labels)
            if not labels or len(set(labels)) != len(labels):
                raise InvalidInputError(f"labels must be a non-empty list of distinct words, got {labels!r}")
            missing = [w for w in labels if w not in words]
            if missing:
                logger.warning("labels %s have no folder under %s", missing, self.root)
            self.classes = (*labels, UNKNOWN)
            mapping = {w: labels.index(w) if w in labels else len(labels) for w in words}
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.samples: list[tuple[str, int, str]] = []
        held_out = val | test
        for w in words:
            for f in sorted((self.root / w).glob("*.wav")):
                rel = f"{w}/{f.name}"
                in_split = (
                    rel in val if split == "val" else rel in test if split == "test" else rel not in held_out
                )
                if in_split:
                    self.samples.append((rel, mapping[w], f.name.split("_nohash_")[0]))
        self.targets = [s[1] for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, Any]:
        rel, label, _ = self.samples[index]
        path = self.root / rel
        try:
            x, sr = sf.read(path, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise UnsupportedFormatError(f"cannot read {path}: {e}") from e
        wav = torch.from_numpy(np.ascontiguousarray(x.T))
        target: Any = label
        if self.transform is not None:
            wav = self.transform(wav)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return wav, sr, target

    def __repr__(self) -> str:
        return f"SpeechCommands(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, classes={len(self.classes)})"
