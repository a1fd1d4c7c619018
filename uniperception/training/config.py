"""Training configuration: one dataclass, loadable from a TOML recipe."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

__all__ = ["TrainConfig", "load_recipe"]


@dataclasses.dataclass
class TrainConfig:
    """Everything the training loop needs besides the model and the data.

    Learning rate follows a linear warm-up then a cosine decay to ``min_lr``, per optimiser step.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    amp: str | None = None  # None or "bf16"
    grad_checkpointing: bool = False
    seed: int = 0
    num_workers: int = 0
    out_dir: str = "runs/train"
    eval_every: int = 1  # epochs
    save_every: int = 1  # epochs
    keep_last: int = 2
    progress: bool = True
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke tests)
    keep_freed_memory: bool = True  # glibc: reuse freed buffers instead of mmap/munmap per step (25-40 % faster)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidInputError("epochs and batch_size must be >= 1")
        if self.amp not in (None, "bf16"):
            raise InvalidInputError(f"amp must be None or 'bf16', got {self.amp!r}")
        if self.lr <= 0:
            raise InvalidInputError("lr must be > 0")
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys (typos must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InvalidInputError(f"unknown training option(s): {sorted(unknown)}")
        return cls(**d)


def load_recipe(path_or_name: str | Path) -> dict[str, Any]:
    """Read a TOML recipe (a path, or the name of one shipped in ``uniperception/recipes``)."""
    p = Path(path_or_name)
    if not p.is_file():
        shipped = Path(__file__).resolve().parent.parent / "recipes" / f"{path_or_name}.toml"
        if not shipped.is_file():
            available = sorted(q.stem for q in shipped.parent.glob("*.toml"))
            raise InvalidInputError(f"no recipe {path_or_name!r}; shipped recipes: {available}")
        p = shipped
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InvalidInputError(f"recipe {p} is not valid TOML: {e}") from e
