"""Fetch real data files shipped inside Debian packages, without installing the packages.

Used by the tests (and handy for examples): ``apt-get download <pkg>`` into a cache folder, then extract
selected members with ``dpkg --fsys-tarfile``. Needs a Debian/Ubuntu system with ``apt-get`` and ``dpkg``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from ._common import MissingDependencyError, atomic_directory, cache_dir

__all__ = ["cgal_meshes", "debian_package"]

logger = logging.getLogger(__name__)

CGAL_DATA_MEMBER = "./usr/share/doc/libcgal-dev/data.tar.gz"


def debian_package(package: str, dest: str | os.PathLike[str] | None = None, timeout: float = 300) -> Path:
    """Path of ``<package>_*.deb`` in ``dest`` (default ``cache_dir()/debian``), downloading it if absent."""
    dest = Path(dest) if dest is not None else cache_dir() / "debian"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise MissingDependencyError(f"apt-get/dpkg not found: cannot fetch the Debian package {package!r}")
    try:
        res = subprocess.run(
            ["apt-get", "download", "-q", package], cwd=dest, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise MissingDependencyError(f"apt-get download {package} timed out after {timeout} s") from e
    found = sorted(dest.glob(f"{package}_*.deb"))
    if res.returncode != 0 or not found:
        raise MissingDependencyError(
            f"apt-get download {package} failed ({res.returncode}): {res.stderr.strip()[-500:]} "
            "(run `apt-get update` first; needs access to a Debian mirror)"
        )
    return found[-1]


def _extract_member(deb: Path, member: str, out: Path) -> None:
    """Write one member of a .deb's data archive to ``out``."""
    with out.open("wb") as f:
        proc = subprocess.Popen(["dpkg", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                if info.name == member:
                    src = tar.extractfile(info)
                    assert src is not None
                    shutil.copyfileobj(src, f)
                    break
            else:
                raise MissingDependencyError(f"{member} not found in {deb.name}")
        proc.stdout.close()
        proc.wait()


def cgal_meshes(dest: str | os.PathLike[str] | None = None) -> Path:
    """The folder of CGAL's example meshes (``*.off``: bunny, elephant, cow, ...) from ``libcgal-demo``.

    Downloaded and extracted once into ``dest`` (default ``cache_dir()/debian``); the returned folder is
    ``<dest>/cgal-data/meshes``. Raises :class:`MissingDependencyError` when the package cannot be obtained.
    """
    dest = Path(dest) if dest is not None else cache_dir() / "debian"
    final = dest / "cgal-data"
    if (final / "meshes").is_dir():
        return final / "meshes"
    deb = debian_package("libcgal-demo", dest)
    with atomic_directory(final) as tmp:
        inner = tmp / "data.tar.gz"
        _extract_member(deb, CGAL_DATA_MEMBER, inner)
        with tarfile.open(inner) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("data/meshes/")]
            for m in members:
                m.name = m.name[len("data/") :]
            tar.extractall(tmp, members=members, filter="data")
        inner.unlink()
    logger.info("extracted CGAL meshes into %s", final / "meshes")
    return final / "meshes"
