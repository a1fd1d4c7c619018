"""A ModelNet-style mesh-folder loader: surface point clouds sampled from ``.off`` (or ``.ply``/``.obj``/``.stl``).

Layouts:

* ModelNet10/40: ``root/<class>/train/*.off`` and ``root/<class>/test/*.off``;
* flat: ``root/<class>/*.off``; then a deterministic split puts ``test_fraction`` of each class's files (at least
  one when a class has two or more) in ``test``, chosen by a shuffle seeded from the class name, so the split
  does not depend on ``seed`` or on the other classes.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InvalidInputError
from ._common import check_positive_int
from ._mesh import MESH_EXTENSIONS, normalize_points, read_mesh, sample_points

__all__ = ["ModelNet", "load_mesh_points"]

logger = logging.getLogger(__name__)


def load_mesh_points(
    path: str | os.PathLike[str],
    num_points: int = 1024,
    rng: np.random.Generator | int | None = None,
    *,
    normalize: bool = True,
    sampling: str = "uniform",
) -> np.ndarray:
    """Read a mesh file and sample ``num_points`` surface points: float32 ``[num_points, 3]``."""
    check_positive_int(num_points, "num_points")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    verts, tris = read_mesh(Path(path))
    pts = sample_points(verts, tris, num_points, rng, sampling)
    if normalize:
        pts = normalize_points(pts)
    return pts.astype(np.float32)


def _mesh_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


class ModelNet(Dataset):
    """Mesh-folder point clouds: ``(points float32 tensor [num_points, 3], label_index)``.

    Args:
        root: the dataset folder (one sub-folder per class).
        split: ``"train"`` or ``"test"``.
        num_points: points sampled per mesh.
        seed: sampling seed; sample ``i`` depends only on ``(seed, i)`` (reproducible per index).
        classes: restrict to (and order by) these class folders; default every class folder, sorted.
        test_fraction: for flat class folders only, the share of files put in ``test``.
        normalize: centre and scale every cloud into the unit sphere.
        sampling: ``"uniform"`` or ``"poisson"`` (Open3D Poisson disk).
        cache_meshes: keep parsed meshes in memory (faster epochs, more memory).
        extensions: mesh file extensions to pick up.
        transform: applied to the points tensor; ``target_transform`` to the label index.

    Attributes: ``classes``, ``samples`` (list of ``(path, label_index)``), ``targets``, ``layout``
    (``{class: "split-folders" | "flat"}``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        num_points: int = 1024,
        seed: int = 0,
        *,
        classes: Sequence[str] | None = None,
        test_fraction: float = 0.2,
        normalize: bool = True,
        sampling: str = "uniform",
        cache_meshes: bool = False,
        extensions: Sequence[str] = (".off",),
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if split not in ("train", "test"):
            raise InvalidInputError(f"unknown split {split!r}; choose 'train' or 'test'")
        if not self.root.is_dir():
            raise InvalidInputError(f"ModelNet root {self.root} is not a directory")
        if not 0 <= test_fraction < 1:
            raise InvalidInputError(f"test_fraction must be in [0, 1), got {test_fraction}")
        if sampling not in ("uniform", "poisson"):
            raise InvalidInputError(f"unknown sampling method {sampling!r}; choose 'uniform' or 'poisson'")
        exts = tuple(e.lower() for e in extensions)
        bad = [e for e in exts if e not in MESH_EXTENSIONS]
        if bad:
            raise InvalidInputError(f"unsupported mesh extensions {bad}; supported: {MESH_EXTENSIONS}")
        found = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
        )
        if classes is None:
            names = found
        else:
            names = list(classes)
            missing = [c for c in names if c not in found]
            if missing:
                raise InvalidInputError(f"class folders {missing} not found under {self.root}")
        if not names:
            raise InvalidInputError(
                f"no class folders under {self.root} (expected root/<class>/[train|test]/*.off)"
            )
        self.classes: tuple[str, ...] = tuple(names)
        self.split = split
        self.num_points = check_positive_int(num_points, "num_points")
        self.seed = seed
        self.normalize = normalize
        self.sampling = sampling
        self.transform = transform
        self.target_transform = target_transform
        self.layout: dict[str, str] = {}
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(names):
            folder = self.root / name
            if (folder / "train").is_dir() or (folder / "test").is_dir():
                self.layout[name] = "split-folders"
                files = _mesh_files(folder / split, exts) if (folder / split).is_dir() else []
            else:
                self.layout[name] = "flat"
                files = _mesh_files(folder, exts)
                order = np.random.default_rng(zlib.crc32(name.encode())).permutation(len(files))
                n_test = math.ceil(len(files) * test_fraction) if len(files) >= 2 else 0
                chosen = set(order[:n_test].tolist()) if split == "test" else set(order[n_test:].tolist())
                files = [f for i, f in enumerate(files) if i in chosen]
            self.samples.extend((f, label) for f in files)
        if not self.samples:
            raise InvalidInputError(f"no {'/'.join(exts)} files for split {split!r} under {self.root}")
        self.targets = [label for _, label in self.samples]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache_meshes else None

    def __len__(self) -> int:
        return len(self.samples)

    def _mesh(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        mesh = read_mesh(self.samples[index][0])
        if self._cache is not None:
            self._cache[index] = mesh
        return mesh

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        verts, tris = self._mesh(index)
        rng = np.random.default_rng([self.seed, index])
        pts = sample_points(verts, tris, self.num_points, rng, self.sampling)
        if self.normalize:
            pts = normalize_points(pts)
        x: Any = torch.from_numpy(pts.astype(np.float32))
        y: Any = self.samples[index][1]
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    def __repr__(self) -> str:
        return f"ModelNet(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, classes={len(self.classes)})"
