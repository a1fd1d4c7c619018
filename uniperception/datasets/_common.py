"""Shared plumbing of the datasets: the cache directory, atomic generation, parameter keys, tool checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, UniperceptionError

__all__ = [
    "MissingDependencyError",
    "atomic_directory",
    "cache_dir",
    "params_key",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "all": 3}


class MissingDependencyError(UniperceptionError, RuntimeError):
    """A system tool or optional Python package that a dataset needs is not installed; the message says how."""


def cache_dir() -> Path:
    """The toolkit's cache directory: ``$UNIPERCEPTION_CACHE`` if set, else ``~/.cache/uniperception``.

    The directory is not created here; generators create what they need below it.
    """
    env = os.environ.get("UNIPERCEPTION_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/uniperception").expanduser()


def dataset_root(root: str | os.PathLike[str] | None, name: str) -> Path:
    """Where a generated dataset lives: ``root`` if given, else ``cache_dir()/datasets/<name>``."""
    return Path(root).expanduser() if root is not None else cache_dir() / "datasets" / name


def params_key(params: dict[str, Any], length: int = 12) -> str:
    """A short stable hash of JSON-serialisable generation parameters (the name of a cache subfolder)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def split_code(split: str, allowed: Sequence[str] = (*SPLITS, "all")) -> int:
    """Validate a split name and return a small integer used to seed that split's random stream."""
    if split not in allowed:
        raise InvalidInputError(f"unknown split {split!r}; choose one of {', '.join(map(repr, allowed))}")
    return _SPLIT_CODES[split]


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a positive ``int``, or :class:`InvalidInputError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def require_tools(tools: Sequence[str], install_hint: str) -> None:
    """Raise :class:`MissingDependencyError` naming every tool of ``tools`` that is not on ``PATH``."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise MissingDependencyError(
            f"required command-line tool(s) not found: {', '.join(missing)}. Install them with: {install_hint}"
        )


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-")


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove temporary folders left by interrupted generations (their process is gone)."""
    for p in parent.glob(f".{name}.tmp-*"):
        m = _TMP_RE.match(p.name)
        if not m or m.group("name") != name:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("removing %s left by an interrupted generation", p)
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # pragma: no cover - another user's live process
            continue


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; rename it to ``final`` when the block succeeds.

    An exception (or a kill) never leaves a half-written ``final``: the temporary folder is removed (or, after
    a kill, cleaned up by the next generation). If another process finished ``final`` first, ours is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        if final.is_dir():  # a concurrent generation won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def ensure_generated(final: Path, marker: str, generate: Callable[[Path], None]) -> Path:
    """Return ``final`` after generating it with ``generate(tmpdir)`` unless ``final/marker`` already exists."""
    if (final / marker).is_file():
        return final
    if final.exists():
        # A folder without its marker was not written by us atomically (e.g. copied by hand): refuse to guess.
        raise InvalidInputError(
            f"{final} exists but has no {marker}: it is incomplete or foreign; delete it to regenerate"
        )
    logger.info("generating %s (first use; written atomically)", final)
    t0 = time.perf_counter()
    with atomic_directory(final) as tmp:
        generate(tmp)
        if not (tmp / marker).is_file():  # pragma: no cover - generator bug
            raise RuntimeError(f"generator did not write {marker}")
    logger.info("generated %s in %.1f s", final, time.perf_counter() - t0)
    return final


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as stable, pretty JSON."""
    path.write_text(json.dumps(obj, sort_keys=True, indent=2, default=str) + "\n")


def import_open3d() -> Any:
    """Import Open3D, preloading the wheel-shipped ``libusb`` it links against (absent on headless machines)."""
    import ctypes

    try:
        import libusb_package

        lib = libusb_package.get_library_path()
        if lib is not None:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except (ImportError, OSError):  # pragma: no cover - fall back to a system libusb
        pass
    try:
        import open3d
    except ImportError as e:  # pragma: no cover - open3d is a hard dependency
        raise MissingDependencyError(
            f"open3d could not be imported ({e}); install open3d-cpu==0.20.0 (or apt-get install libusb-1.0-0)"
        ) from e
    return open3d
