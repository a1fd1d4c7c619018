"""Shapes: point clouds sampled from Open3D's primitive meshes, generated on the fly.

Each sample takes one of ten primitives (:data:`SHAPE_CLASSES`), stretches it by a random anisotropic scale,
rotates it uniformly at random, samples ``num_points`` points on its surface, normalises the cloud into the unit
sphere, adds Gaussian jitter and drops a random fraction of points (replaced by duplicates of kept points so
every cloud has exactly ``num_points``). Sample ``i`` of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InvalidInputError
from ._common import check_positive_int, import_open3d, split_code
from ._mesh import normalize_points, random_rotation, sample_points

__all__ = ["SHAPE_CLASSES", "Shapes", "partial_view", "primitive_mesh", "sample_shape"]

#: Label names, in label-index order (see CONTRACTS.md).
SHAPE_CLASSES: tuple[str, ...] = (
    "box", "sphere", "cylinder", "cone", "torus", "tetrahedron", "octahedron", "icosahedron", "arrow", "moebius",
)  # fmt: skip
_CREATOR = {name: f"create_{name}" for name in SHAPE_CLASSES} | {"moebius": "create_mobius"}
DEFAULT_NUM_PER_CLASS = {"train": 100, "val": 20, "test": 20, "all": 100}


@cache
def primitive_mesh(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(vertices ``[V, 3]`` float64, triangles ``[F, 3]`` int64) of an Open3D primitive with default parameters."""
    if name not in _CREATOR:
        raise InvalidInputError(f"unknown shape {name!r}; choose one of {', '.join(SHAPE_CLASSES)}")
    o3d = import_open3d()
    mesh = getattr(o3d.geometry.TriangleMesh, _CREATOR[name])()
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    verts = verts - (verts.max(0) + verts.min(0)) / 2
    verts.setflags(write=False)
    tris = np.asarray(mesh.triangles, dtype=np.int64)
    tris.setflags(write=False)
    return verts, tris


def sample_shape(
    name: str,
    num_points: int = 1024,
    rng: np.random.Generator | int | None = None,
    *,
    scale_range: tuple[float, float] = (0.6, 1.4),
    rotate: bool = True,
    noise_std: float = 0.01,
    max_dropout: float = 0.2,
    sampling: str = "uniform",
) -> np.ndarray:
    """One randomised point cloud of primitive ``name``: float32 ``[num_points, 3]`` inside the unit sphere."""
    check_positive_int(num_points, "num_points")
    if not 0 <= max_dropout < 1:
        raise InvalidInputError(f"max_dropout must be in [0, 1), got {max_dropout}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    verts, tris = primitive_mesh(name)
    verts = verts * rng.uniform(*scale_range, size=3)
    pts = sample_points(verts, tris, num_points, rng, sampling)
    if rotate:
        pts = pts @ random_rotation(rng).T
    pts = normalize_points(pts)
    if noise_std > 0:
        pts = pts + rng.normal(0.0, noise_std, size=pts.shape)
    if max_dropout > 0:
        n_drop = int(rng.uniform(0, max_dropout) * num_points)
        if n_drop:
            dropped = rng.choice(num_points, size=n_drop, replace=False)
            keep = np.setdiff1d(np.arange(num_points), dropped)
            pts[dropped] = pts[rng.choice(keep, size=n_drop)]
    return pts.astype(np.float32)


def partial_view(
    points: np.ndarray, rng: np.random.Generator | int | None = None, distance: float = 3.0, radius: float = 300.0
) -> np.ndarray:
    """The points one camera sees (Open3D hidden-point removal) from a random direction at ``distance``.

    ``points`` is ``[N, 3]`` inside the unit sphere; roughly the half facing the camera is kept, as a depth
    sensor would capture it. Used to test classifiers on partial views they were not trained on.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 4:
        raise InvalidInputError(f"points must be [N>=4, 3], got {pts.shape}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    direction = rng.normal(size=3)
    camera = distance * direction / np.linalg.norm(direction)
    o3d = import_open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    _, idx = cloud.hidden_point_removal(camera, radius * distance)
    return np.asarray(points)[np.asarray(idx, dtype=np.int64)]


class Shapes(Dataset):
    """Random primitive point clouds: ``(points float32 tensor [num_points, 3], label_index)``.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``: independent random streams of the same generator.
        num_per_class: samples per class (default 100 for train/all, 20 for val/test); labels cycle over classes.
        num_points: points per cloud (default 1024).
        seed: base seed; sample ``i`` depends only on ``(seed, split, i)``, so any index is reproducible alone.
        scale_range: per-axis scale factors (anisotropic stretch) drawn uniformly from this range.
        noise_std: Gaussian jitter after normalisation to the unit sphere; ``max_dropout``: up to this fraction
            of points are dropped (and replaced by duplicates of kept points).
        sampling: ``"uniform"`` (area-weighted, numpy) or ``"poisson"`` (Open3D Poisson disk, slower).
        num_points_range: if given, each cloud's point count is drawn log-uniformly from this range instead
            (training for sparse and dense scans; the adapter resamples to its own ``num_points``).
        partial_prob: the probability that a sample is a single partial view (:func:`partial_view` of a cloud
            with three times the points), training for one-sided scans.
        cache: keep each generated cloud in memory (samples are deterministic per index, so epochs after the
            first skip generation: ~3 ms per sample, 100 ms of a batch of 32; about 25 MB per 1000 clouds).
        transform: applied to the points tensor; ``target_transform`` to the label index.
    """

    classes: tuple[str, ...] = SHAPE_CLASSES

    def __init__(
        self,
        split: str = "train",
        num_per_class: int | None = None,
        num_points: int = 1024,
        seed: int = 0,
        *,
        scale_range: tuple[float, float] = (0.6, 1.4),
        rotate: bool = True,
        noise_std: float = 0.01,
        max_dropout: float = 0.2,
        sampling: str = "uniform",
        num_points_range: tuple[int, int] | None = None,
        partial_prob: float = 0.0,
        cache: bool = False,
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self._split_code = split_code(split)
        if num_points_range is not None:
            lo, hi = (int(v) for v in num_points_range)
            if not 4 <= lo <= hi:
                raise InvalidInputError(f"num_points_range must be 4 <= low <= high, got {num_points_range}")
            num_points_range = (lo, hi)
        if not 0.0 <= partial_prob <= 1.0:
            raise InvalidInputError(f"partial_prob must be in [0, 1], got {partial_prob}")
        self.num_points_range = num_points_range
        self.partial_prob = float(partial_prob)
        self.split = split
        self.num_per_class = check_positive_int(
            DEFAULT_NUM_PER_CLASS[split] if num_per_class is None else num_per_class, "num_per_class"
        )
        self.num_points = check_positive_int(num_points, "num_points")
        if sampling not in ("uniform", "poisson"):
            raise InvalidInputError(f"unknown sampling method {sampling!r}; choose 'uniform' or 'poisson'")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise InvalidInputError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.seed = seed
        self.options: dict[str, Any] = {
            "scale_range": tuple(scale_range),
            "rotate": rotate,
            "noise_std": noise_std,
            "max_dropout": max_dropout,
            "sampling": sampling,
        }
        self.transform = transform
        self.target_transform = target_transform
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self.targets = [i % len(SHAPE_CLASSES) for i in range(len(self))]

    def __len__(self) -> int:
        return self.num_per_class * len(SHAPE_CLASSES)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        label = index % len(SHAPE_CLASSES)
        pts = self._cache.get(index) if self._cache is not None else None
        if pts is None:
            pts = self._generate(index, label)
            if self._cache is not None:
                self._cache[index] = pts
        x: Any = torch.from_numpy(pts.copy() if self._cache is not None else pts)  # callers may modify x
        y: Any = label
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    def _generate(self, index: int, label: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self._split_code, index])
        n = self.num_points
        if self.num_points_range is not None:  # log-uniform point count (sparse and dense scans)
            lo, hi = self.num_points_range
            n = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        partial = self.partial_prob > 0 and rng.uniform() < self.partial_prob
        pts = sample_shape(SHAPE_CLASSES[label], 3 * n if partial else n, rng, **self.options)
        if partial:  # what one camera sees: about a third of the points of a 3n-point cloud
            pts = partial_view(pts, rng)
        return pts

    def __repr__(self) -> str:
        return f"Shapes(split={self.split!r}, n={len(self)}, num_points={self.num_points}, seed={self.seed})"
