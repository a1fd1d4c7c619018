"""Quick, interleaved speed measurements of a model's forms and convolution engines (``uniperception benchmark``).

The full benchmark suite lives in the repository's ``benchmarks/`` folder; this module is the installed,
command-line face of it: it times a registered model in several configurations round-robin (so a busy
machine slows every configuration alike), reports medians and ratios, and never asserts a time.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .backbones import create_model

__all__ = ["BenchResult", "benchmark_model"]


@dataclass
class BenchResult:
    """Median time of one configuration."""

    config: str
    form: str
    impl: str
    mode: str
    batch: int
    median_ms: float
    times_ms: list[float]

    @property
    def images_per_s(self) -> float:
        """Throughput at this batch size."""
        return self.batch / (self.median_ms / 1e3)


def _step(model: nn.Module, x: torch.Tensor, mode: str, opt: torch.optim.Optimizer | None) -> None:
    if mode == "inference":
        with torch.inference_mode():
            model(x)
        return
    assert opt is not None
    opt.zero_grad(set_to_none=True)
    out = model(x)
    out.float().pow(2).mean().backward()
    opt.step()


def benchmark_model(
    name: str = "unireplknet_a",
    batch: int = 32,
    img_size: int = 224,
    forms: Sequence[str] = ("training", "deploy"),
    impls: Sequence[str] = ("native", "auto"),
    mode: str = "inference",
    repeats: int = 5,
    threads: int | None = None,
) -> list[BenchResult]:
    """Time ``name`` in every (form, impl) configuration, interleaved; returns one result per configuration.

    ``mode`` is ``"inference"`` (forward under ``inference_mode``) or ``"training"`` (forward, backward and an
    AdamW step). The deploy form is a re-parameterised copy of the same randomly initialised model.
    """
    if mode not in ("inference", "training"):
        raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = create_model(name)
    configs: list[tuple[str, str, nn.Module, torch.optim.Optimizer | None]] = []
    for form in forms:
        src = base if form == "training" else copy.deepcopy(base).reparameterize()
        for impl in impls:
            m = copy.deepcopy(src)
            m.set_conv_impl(impl)  # type: ignore[operator]
            m.train(mode == "training")
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4) if mode == "training" else None
            configs.append((form, impl, m, opt))
    x = torch.randn(batch, base.in_chans, img_size, img_size)
    for _, _, m, opt in configs:  # warm-up (and the training-form lock of conv implementations)
        _step(m, x, mode, opt)
    times: list[list[float]] = [[] for _ in configs]
    for r in range(repeats):
        order = list(range(len(configs)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            _, _, m, opt = configs[i]
            t0 = time.perf_counter()
            _step(m, x, mode, opt)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [
        BenchResult(f"{form}/{impl}", form, impl, mode, batch, statistics.median(ts), ts)
        for (form, impl, _, _), ts in zip(configs, times, strict=True)
    ]
