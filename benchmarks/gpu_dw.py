"""GPU speed of the engine's Triton depthwise kernel against PyTorch's own convolution (cuDNN).

For every (pass, dtype, stage shape, kernel) asked for (default: forward and forward+backward, float32 and
bfloat16, the UniRepLKNet-A stage shapes ``40@56 80@28 160@14 320@7``, kernels 13/31/51, batch 64), the same
tensors run through

* ``cudnn``: ``F.conv2d(x, w, None, 1, k // 2, 1, groups=C)`` with ``torch.backends.cudnn.benchmark`` on
  (TF32 off unless ``--allow-tf32``: a float32 comparison is a float32 one);
* ``triton``: ``uniperception.ops.depthwise_conv2d(..., impl="triton")`` (what ``impl="auto"`` picks on CUDA
  for kernels of 7 and more; the engine's kernel cropping is part of the call).

Each is warmed up (Triton compiles, cuDNN autotunes), then timed with CUDA events in interleaved rounds
(one call of each per round, starting implementation alternating); the table has medians, the speed-up is the
median of per-round ratios cudnn/triton, and the peak memory above the inputs for one call of each. Before
timing, every output and gradient is compared with a float32 cuDNN reference on the same values (``max rel.
err``). ``--time-budget`` caps the rounds of slow configurations. Markdown goes to stdout, progress to stderr,
``--json`` writes the raw timings. Nothing is asserted about times.

Prepared to run in one short call on a lent GPU machine::

    .venv/bin/python benchmarks/gpu_dw.py --time-budget 180 --json "$OUT/gpu_dw.json"

``--device cpu`` runs the same script through Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before Triton is imported) with ``F.conv2d`` on the CPU as the reference: a smoke test of the script and
of the kernel's correctness on machines without a GPU (use tiny ``--shapes``/``--batch``; the interpreter is
slow and its times mean nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from _common import git_revision, write_json
except ImportError:  # run as ``python -m benchmarks.gpu_dw``
    from benchmarks._common import git_revision, write_json

DEFAULT_SHAPES = ["40@56", "80@28", "160@14", "320@7"]
DEFAULT_KERNELS = [13, 31, 51]
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("cudnn", "triton")


@dataclass
class Config:
    pass_: str
    dtype: str
    batch: int
    c: int
    h: int
    k: int

    @property
    def label(self) -> str:
        return f"{self.pass_} {self.dtype} b{self.batch} {self.c}@{self.h}² {self.k}×{self.k}"


@dataclass
class Result:
    config: Config
    times_ms: dict[str, list[float]] = field(default_factory=lambda: {i: [] for i in IMPLS})
    ratios: list[float] = field(default_factory=list)
    peak_mb: dict[str, float | None] = field(default_factory=dict)
    rel_err: dict[str, float] = field(default_factory=dict)

    def ms(self, impl: str) -> float:
        return statistics.median(self.times_ms[impl]) if self.times_ms[impl] else math.nan

    def speedup(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan


def parse_shape(s: str) -> tuple[int, int]:
    c, h = s.split("@")
    return int(c), int(h)


def build_grid(passes: list[str], dtypes: list[str], batches: list[int], shapes: list[str],
               kernels: list[int]) -> list[Config]:
    return [Config(p, d, b, *parse_shape(s), k) for p in passes for d in dtypes for b in batches for s in shapes
            for k in kernels]


class Timer:
    """Wall time of one call: CUDA events on a GPU, ``perf_counter`` after the call on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def make_tensors(cfg: Config, device: torch.device, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[cfg.dtype]
    x = torch.randn(cfg.batch, cfg.c, cfg.h, cfg.h, generator=gen).to(device, dt)
    w = (torch.randn(cfg.c, 1, cfg.k, cfg.k, generator=gen) / cfg.k).to(device, dt)
    gy = torch.randn(cfg.batch, cfg.c, cfg.h, cfg.h, generator=gen).to(device, dt)
    return x, w, gy


def make_call(impl: str, cfg: Config, x: Tensor, w: Tensor, gy: Tensor) -> Callable[[], Any]:
    """A zero-argument callable running one forward (no autograd) or forward+backward of ``impl``."""
    from uniperception.ops import depthwise_conv2d

    pad = cfg.k // 2

    def conv(xi: Tensor, wi: Tensor) -> Tensor:
        if impl == "cudnn":
            return F.conv2d(xi, wi, None, 1, pad, 1, cfg.c)
        return depthwise_conv2d(xi, wi, None, 1, pad, 1, impl="triton")

    if cfg.pass_ == "fwd":

        def fwd() -> Tensor:
            with torch.no_grad():
                return conv(x, w)

        return fwd
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)

    def fwd_bwd() -> tuple[Tensor, ...]:
        xr.grad = wr.grad = None
        y = conv(xr, wr)
        y.backward(gy)
        return y.detach(), xr.grad, wr.grad

    return fwd_bwd


def reference(cfg: Config, x: Tensor, w: Tensor, gy: Tensor) -> tuple[Tensor, ...]:
    """Float32 cuDNN (or CPU) output and gradients on the same values."""
    xr = x.detach().float().requires_grad_(cfg.pass_ != "fwd")
    wr = w.detach().float().requires_grad_(cfg.pass_ != "fwd")
    with torch.set_grad_enabled(cfg.pass_ != "fwd"):
        y = F.conv2d(xr, wr, None, 1, cfg.k // 2, 1, cfg.c)
        if cfg.pass_ == "fwd":
            return (y,)
        y.backward(gy.float())
    return y.detach(), xr.grad, wr.grad


def rel_err(out: Any, ref: tuple[Tensor, ...]) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    err = 0.0
    for a, r in zip(outs, ref, strict=True):
        scale = float(r.abs().max()) or 1.0
        err = max(err, float((a.float() - r).abs().max()) / scale)
    return err


def peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Device memory one call allocates above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(cfg: Config, device: torch.device, args: argparse.Namespace, share_s: float | None) -> Result:
    timer = Timer(device)
    x, w, gy = make_tensors(cfg, device, args.seed)
    ref = reference(cfg, x, w, gy)
    res = Result(cfg)
    calls = {impl: make_call(impl, cfg, x, w, gy) for impl in IMPLS}
    est = {}
    for impl, call in calls.items():
        res.rel_err[impl] = rel_err(call(), ref)  # first call: compiles / autotunes
        res.peak_mb[impl] = peak_mb(call, device)
        est[impl] = timer(call)
    round_ms = sum(est.values())
    rounds = args.repeats
    if share_s is not None:
        rounds = min(rounds, max(args.min_repeats, int(share_s * 1e3 / max(round_ms, 1e-6))))
    for r in range(rounds):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        t = {impl: timer(calls[impl]) for impl in order}
        for impl in IMPLS:
            res.times_ms[impl].append(t[impl])
        res.ratios.append(t["cudnn"] / t["triton"])
    return res


def device_line(device: torch.device) -> str:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        extra = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        name, extra = "CPU (Triton interpreter: times are not GPU times)", "no CUDA"
    return f"{name}; torch {torch.__version__}, {extra}, Triton {triton.__version__}"


def markdown(results: list[Result], meta: dict[str, Any]) -> str:
    lines = [
        f"{meta['device']}; uniperception ({meta['git']}), {meta['date']}; TF32 for cuDNN float32 convs: "
        f"{'on' if meta['allow_tf32'] else 'off'}; cudnn.benchmark on.",
        "",
        "| Pass | dtype | Batch | C@H² | Kernel | cuDNN (ms) | Triton (ms) | × (cuDNN/Triton) | cuDNN peak (MB) "
        "| Triton peak (MB) | max rel. err cuDNN / Triton | rounds |",
        "|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    for r in results:
        c = r.config
        lines.append(
            f"| {c.pass_} | {c.dtype} | {c.batch} | {c.c}@{c.h}² | {c.k}×{c.k} | {r.ms('cudnn'):.3g} "
            f"| {r.ms('triton'):.3g} | **{r.speedup():.3g}** | {mb(r.peak_mb.get('cudnn'))} "
            f"| {mb(r.peak_mb.get('triton'))} | {r.rel_err['cudnn']:.0e} / {r.rel_err['triton']:.0e} "
            f"| {len(r.ratios)} |"
        )
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter smoke run)")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="C@H (default: UniRepLKNet-A stages)")
    p.add_argument("--kernels", nargs="+", type=int, default=DEFAULT_KERNELS)
    p.add_argument("--batch", nargs="+", type=int, default=[64])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--repeats", type=int, default=20, help="max timed rounds per configuration (default 20)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="spread about this many seconds of timed rounds over the configurations")
    p.add_argument("--allow-tf32", action="store_true", help="let cuDNN use TF32 for float32 convolutions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write results (raw timings) to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_dw.py: no CUDA device here (use --device cpu for the interpreter smoke run)", file=sys.stderr)
        return 2
    if device.type == "cpu":
        if "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_dw.py: Triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined (first import)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_dw.py: Triton is not installed", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = args.allow_tf32
    grid = build_grid(args.passes, args.dtypes, args.batch, args.shapes, args.kernels)
    share = args.time_budget / len(grid) if args.time_budget else None
    results = []
    for i, cfg in enumerate(grid, 1):
        t0 = time.perf_counter()
        results.append(bench(cfg, device, args, share))
        r = results[-1]
        print(f"[{i}/{len(grid)}] {cfg.label}: cudnn {r.ms('cudnn'):.3g} ms, triton {r.ms('triton'):.3g} ms, "
              f"x{r.speedup():.3g} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    meta = {
        "device": device_line(device),
        "git": git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "allow_tf32": args.allow_tf32,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None
        else "python benchmarks/gpu_dw.py " + " ".join(argv),
    }
    print(markdown(results, meta))
    if args.json:
        out = {
            "meta": meta,
            "results": [
                {
                    "pass": r.config.pass_, "dtype": r.config.dtype, "batch": r.config.batch,
                    "shape": [r.config.c, r.config.h, r.config.h], "kernel": r.config.k,
                    "ms": {i: r.ms(i) for i in IMPLS}, "speedup_triton_vs_cudnn": r.speedup(),
                    "peak_mb": r.peak_mb, "max_rel_err": r.rel_err, "times_ms": r.times_ms,
                }
                for r in results
            ],
        }
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
