"""Triangle-mesh helpers shared by the point-cloud datasets: reading, validating and surface sampling."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, UnsupportedFormatError
from ._common import import_open3d

__all__ = ["normalize_points", "random_rotation", "read_mesh", "sample_points", "sample_surface"]

logger = logging.getLogger(__name__)

MESH_EXTENSIONS = (".off", ".ply", ".obj", ".stl")


def sample_surface(
    vertices: np.ndarray, triangles: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` points uniformly distributed on a triangle mesh's surface (area-weighted, float64 ``[n, 3]``).

    The numpy equivalent of Open3D's ``sample_points_uniformly``, but driven by ``rng`` so it is reproducible.
    """
    tri = vertices[triangles]  # [F, 3, 3]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        raise InvalidInputError("mesh has zero surface area (degenerate triangles); cannot sample points")
    idx = rng.choice(len(tri), size=n, p=areas / total)
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[idx]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def sample_points(
    vertices: np.ndarray, triangles: np.ndarray, n: int, rng: np.random.Generator, method: str = "uniform"
) -> np.ndarray:
    """Sample ``n`` surface points: ``"uniform"`` (:func:`sample_surface`) or ``"poisson"`` (Open3D Poisson disk)."""
    if method == "uniform":
        return sample_surface(vertices, triangles, n, rng)
    if method == "poisson":
        o3d = import_open3d()
        mesh = o3d.geometry.TriangleMesh(
            o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(triangles)
        )
        o3d.utility.random.seed(int(rng.integers(2**31 - 1)))
        with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            pcd = mesh.sample_points_poisson_disk(n)
        pts = np.asarray(pcd.points)
        if len(pts) != n:  # Open3D can return fewer points on tiny meshes: top up uniformly
            pts = np.concatenate([pts, sample_surface(vertices, triangles, n - len(pts), rng)])[:n]
        return pts
    raise InvalidInputError(f"unknown sampling method {method!r}; choose 'uniform' or 'poisson'")


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed random 3-D rotation matrix (from a random unit quaternion)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def normalize_points(points: np.ndarray) -> np.ndarray:
    """Centre a point set at its centroid and scale it into the unit sphere (ModelNet's usual normalisation)."""
    centred = points - points.mean(axis=0, keepdims=True)
    radius = np.linalg.norm(centred, axis=1).max()
    return centred / radius if radius > 0 else centred


_OFF_HEADER = re.compile(r"^\s*(ST)?(C)?(N)?(4)?OFF\s*(.*)$")


def _parse_off(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A tolerant OFF reader (comments, ``COFF``/``NOFF``, polygons, ModelNet's ``OFF<nv> <nf> <ne>`` header)."""
    try:
        text = path.read_text(errors="strict")
    except (UnicodeDecodeError, OSError) as e:
        raise InvalidInputError(f"{path}: not a text OFF file ({e})") from e
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise InvalidInputError(f"{path}: empty file")
    m = _OFF_HEADER.match(lines[0])
    if not m:
        raise InvalidInputError(f"{path}: not an OFF file (first line {lines[0][:40]!r})")
    rest = m.group(5).split()
    body = lines[1:]
    if not rest:
        if not body:
            raise InvalidInputError(f"{path}: OFF header has no vertex/face counts")
        rest, body = body[0].split(), body[1:]
    try:
        nv, nf = int(rest[0]), int(rest[1])
        verts = np.array([[float(t) for t in ln.split()[:3]] for ln in body[:nv]], dtype=np.float64)
        faces: list[list[int]] = []
        for ln in body[nv : nv + nf]:
            tok = ln.split()
            k = int(tok[0])
            idx = [int(t) for t in tok[1 : 1 + k]]
            if len(idx) != k:
                raise ValueError(f"face line {ln!r} has fewer than {k} indices")
            faces.extend([idx[0], idx[j], idx[j + 1]] for j in range(1, k - 1))  # fan triangulation
    except (ValueError, IndexError) as e:
        raise InvalidInputError(f"{path}: corrupt OFF file ({e})") from e
    if verts.shape != (nv, 3) or len(body) < nv + nf:
        raise InvalidInputError(f"{path}: corrupt OFF file (header announces {nv} vertices and {nf} faces)")
    return verts, np.asarray(faces, dtype=np.int64).reshape(-1, 3)


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (``.off``, ``.ply``, ``.obj``, ``.stl``) with Open3D; return (vertices, triangles).

    OFF files that Open3D cannot read completely (ModelNet's glued ``OFF<nv> <nf> 0`` header, per-vertex colours)
    fall back to a tolerant parser. Empty, corrupt, face-less or non-finite meshes raise
    :class:`~uniperception.errors.InvalidInputError`; other extensions raise ``UnsupportedFormatError``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_EXTENSIONS:
        raise UnsupportedFormatError(
            f"{path}: unsupported mesh format {suffix!r}; use one of {MESH_EXTENSIONS}"
        )
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"{path}: empty file")
    o3d = import_open3d()
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        mesh = o3d.io.read_triangle_mesh(str(path))
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    tris = np.asarray(mesh.triangles, dtype=np.int64)
    if suffix == ".off":
        # Open3D reports partial reads only as warnings: compare with the header and re-read if needed.
        try:
            expected_v, expected_f = _off_counts(path)
        except InvalidInputError:
            expected_v, expected_f = -1, -1
        if len(verts) != expected_v or len(tris) < expected_f:
            verts, tris = _parse_off(path)
    if len(verts) == 0:
        raise InvalidInputError(f"{path}: mesh has no vertices (empty or unreadable file)")
    if len(tris) == 0:
        raise InvalidInputError(f"{path}: mesh has no faces (a point set, not a surface mesh)")
    if not np.isfinite(verts).all():
        raise InvalidInputError(f"{path}: mesh has non-finite vertex coordinates")
    if tris.min() < 0 or tris.max() >= len(verts):
        raise InvalidInputError(f"{path}: face indices out of range (corrupt mesh)")
    return verts, tris


def _off_counts(path: Path) -> tuple[int, int]:
    """(vertex count, face count) from an OFF header, skipping comments."""
    tokens: list[str] = []
    with open(path, errors="replace") as f:
        for raw in f:
            ln = raw.split("#", 1)[0].strip()
            if not ln:
                continue
            if not tokens:
                m = _OFF_HEADER.match(ln)
                if not m:
                    raise InvalidInputError(f"{path}: not an OFF file")
                tokens = ["OFF", *m.group(5).split()]
            else:
                tokens.extend(ln.split())
            if len(tokens) >= 3:
                try:
                    return int(tokens[1]), int(tokens[2])
                except ValueError as e:
                    raise InvalidInputError(f"{path}: bad OFF header") from e
    raise InvalidInputError(f"{path}: truncated OFF header")
