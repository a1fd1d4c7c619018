"""Op-level CPU speed of large-kernel depthwise convolution: ``uniperception.ops`` (auto) vs PyTorch (native).

For every configuration — UniRepLKNet-A stage shapes ``C@H×W`` = 40@56², 80@28², 160@14², 320@7²; kernels
3, 7, 13, 31, 51 and 51×5 (rectangular, padding (25, 2)), always "same" padding, stride 1, no bias; batch 1
and 32; pass ``fwd`` (inference, under ``torch.inference_mode()``) and ``fwd+bwd`` (forward, then backward of
a fixed random output gradient, producing the input and weight gradients) — it times, side by side:

* ``native``: ``F.conv2d(x, w, None, 1, padding, 1, groups=C)`` exactly as the official code calls it
  (no kernel cropping);
* ``auto``: ``uniperception.ops.depthwise_conv2d(x, w, None, 1, padding, impl="auto")`` (crops the kernel to
  the taps that reach the image, then runs the implementation its cost model picks; the report names it,
  as :func:`uniperception.ops.resolve_impl` gives it);
* with ``--all-impls`` also ``channels_last``, ``fft``, ``blocked`` (inference only) and ``native_crop``
  (``depthwise_conv2d(impl="native")``: PyTorch's conv after the engine's kernel cropping).

The kernel is an ``nn.Parameter``, as in every layer: in inference the FFT implementation keeps a
parameter's spectrum between calls (:func:`uniperception.ops.set_fft_kernel_cache`; ``--no-kernel-cache``
measures without). Both get the same NCHW-contiguous float32 input (``--channels-last-input`` gives both a channels-last one),
so layout conversions an implementation needs are part of its time. Each configuration is warmed up, then
timed in interleaved rounds (every implementation once per round, starting one rotating); times are medians
over the rounds and the speed-up is the median of per-round ratios native/auto. Calls whose warm run takes
longer than ``--slow-call`` seconds (PyTorch's 51×51 backward at 56² and batch 32 takes several seconds)
get only ``--min-repeats`` rounds, and ``--time-budget`` spreads the remaining time over the remaining
configurations. Fast configurations get extra rounds until their timed calls last ``--min-time``. Every
configuration reports the share of the machine's CPU that *other* processes used during its timed calls
(from ``/proc/stat``); those above ``--retry-above`` are re-run, up to ``--retries`` passes within the
budget, keeping the less contended result; with ``--wait-quiet`` the script first sleeps until the other
jobs are gone. The header's CPU share (process CPU time / (wall × threads)) counts only calls of
≥ 5 ms: shorter ones mostly run on one thread. The outputs (and gradients) of
every implementation are compared with ``native``.

Peak extra memory (MB) of one call, Linux only and approximate: free heap pages are returned to the OS
(``malloc_trim``), ``VmHWM`` is reset (``echo 5 > /proc/self/clear_refs``), VmRSS is read, the call runs once,
and the result is VmHWM − VmRSS(before). It counts what the call allocates and touches (output, gradients,
workspaces, layout copies) at page granularity; allocator caching and the threads' arenas blur it.

``--calibrate`` instead prints, per configuration (native, channels_last, fft and, for training, direct timed; kernel cropped with
:func:`uniperception.ops.crop_kernel_to_reach`), the measured ``channels_last`` and ``fft`` times next to
:func:`uniperception.ops.estimate_cost_ms`, the implementation the cost model picks and the faster measured one.

Run with glibc's malloc told to keep freed memory (the report says whether it was)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        .venv/bin/python benchmarks/lk_conv.py --time-budget 480 --wait-quiet 1800 --json out.json

``--shapes 80@28 320@7``, ``--kernels 13 51x5 7d2`` (``dD``: dilation, "same" padding), ``--batch 32``, ``--passes fwd+bwd`` filter the grid;
``--quick`` is a smoke run (small grid, 2 rounds). Markdown goes to stdout, progress to stderr. Nothing is
asserted about wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniperception.ops import (
    cpu_profile,
    crop_kernel_to_reach,
    depthwise_conv2d,
    estimate_cost_ms,
    resolve_impl,
    set_cpu_profile,
    set_fft_kernel_cache,
)

try:
    from _common import (
        OtherLoad,
        base_meta,
        cpu_share,
        header_line,
        peak_extra_mb,
        wait_for_quiet,
        warn_malloc_env,
        write_json,
    )
except ImportError:  # run as ``python -m benchmarks.lk_conv``
    from benchmarks._common import (
        OtherLoad,
        base_meta,
        cpu_share,
        header_line,
        peak_extra_mb,
        wait_for_quiet,
        warn_malloc_env,
        write_json,
    )

DEFAULT_SHAPES = ["40@56", "80@28", "160@14", "320@7"]
DEFAULT_KERNELS = ["3", "7", "13", "31", "51", "51x5"]
PASSES = ("fwd", "fwd+bwd")
EXTRA_IMPLS = ("channels_last", "direct", "fft", "blocked", "native_crop")

# (pass, kernel, batch or None = every batch run, target speed-up auto/native), from the engine's issue
TARGETS: list[tuple[str, str, int | None, float]] = [
    ("fwd+bwd", "13", None, 4.0),
    ("fwd+bwd", "31", None, 20.0),
    ("fwd+bwd", "51", None, 20.0),
    ("fwd", "13", 32, 1.8),
    ("fwd", "31", None, 20.0),
    ("fwd", "51", None, 20.0),
]


@dataclass
class Config:
    c: int
    h: int
    w: int
    kh: int
    kw: int
    batch: int
    pass_: str
    dilation: int = 1

    @property
    def padding(self) -> tuple[int, int]:
        return (self.dilation * (self.kh // 2), self.dilation * (self.kw // 2))

    @property
    def dilations(self) -> tuple[int, int]:
        return (self.dilation, self.dilation)

    @property
    def training(self) -> bool:
        return self.pass_ == "fwd+bwd"

    @property
    def shape_label(self) -> str:
        return f"{self.c}@{self.h}²" if self.h == self.w else f"{self.c}@{self.h}×{self.w}"

    @property
    def kernel_label(self) -> str:
        return f"{self.kh}×{self.kw}" + (f" d{self.dilation}" if self.dilation > 1 else "")

    @property
    def kernel_key(self) -> str:
        key = str(self.kh) if self.kh == self.kw else f"{self.kh}x{self.kw}"
        return key + (f"d{self.dilation}" if self.dilation > 1 else "")


@dataclass
class Result:
    config: Config
    impls: list[str]
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    mem_mb: dict[str, float | None] = field(default_factory=dict)
    rel_err: dict[str, float] = field(default_factory=dict)
    auto_impl: str = ""
    rounds: int = 0
    other: OtherLoad = field(default_factory=OtherLoad)

    def ms(self, impl: str) -> float:
        return 1e3 * statistics.median(self.times[impl])

    def share(self, threads: int) -> float:
        """CPU share of this configuration's timed calls (~1 = uncontended)."""
        return cpu_share([t for v in self.times.values() for t in v], [t for v in self.cpu.values() for t in v],
                         threads)

    def speedup(self, impl: str = "auto", ref: str = "native") -> float:
        return statistics.median(r / m for r, m in zip(self.times[ref], self.times[impl], strict=True))


# ------------------------------------------------------------------------------------------------ grid
def parse_shape(s: str) -> tuple[int, int, int]:
    try:
        c, hw = s.split("@")
        h, w = hw.split("x") if "x" in hw else (hw, hw)
        return int(c), int(h), int(w)
    except ValueError as e:
        raise SystemExit(f"bad shape {s!r}; expected C@H or C@HxW, e.g. 40@56") from e


def parse_kernel(s: str) -> tuple[int, int, int]:
    """``K``, ``KHxKW``, optionally with a dilation suffix ``dD`` (``7d2``, ``3x3d5``) → ``(kh, kw, dilation)``."""
    try:
        spec, _, dil = s.partition("d")
        kh, kw = spec.split("x") if "x" in spec else (spec, spec)
        kh, kw, d = int(kh), int(kw), int(dil or 1)
    except ValueError as e:
        raise SystemExit(f"bad kernel {s!r}; expected K, KHxKW or KdD, e.g. 13, 51x5 or 7d2") from e
    if kh % 2 == 0 or kw % 2 == 0 or d < 1:
        raise SystemExit(f"kernel {s!r}: 'same' padding needs odd sizes (and dilation >= 1)")
    return kh, kw, d


def build_grid(shapes: list[str], kernels: list[str], batches: list[int], passes: list[str]) -> list[Config]:
    grid = []
    for pass_ in passes:
        for b in batches:
            for s in shapes:
                c, h, w = parse_shape(s)
                for k in kernels:
                    kh, kw, d = parse_kernel(k)
                    grid.append(Config(c, h, w, kh, kw, b, pass_, d))
    return grid


# ------------------------------------------------------------------------------------------------ calls
def _conv_fn(impl: str, cfg: Config) -> Callable[[Tensor, Tensor], Tensor]:
    pad = cfg.padding
    if impl == "native":
        return lambda x, w: F.conv2d(x, w, None, 1, pad, cfg.dilation, cfg.c)
    real = "native" if impl == "native_crop" else impl
    return lambda x, w: depthwise_conv2d(x, w, None, 1, pad, cfg.dilation, impl=real)


def make_call(impl: str, cfg: Config, x: Tensor, w: Tensor, gy: Tensor) -> Callable[[], Any]:
    """A zero-argument callable running one forward (inference) or forward+backward of ``impl``."""
    fn = _conv_fn(impl, cfg)
    if not cfg.training:

        def fwd() -> Any:
            with torch.inference_mode():
                return fn(x, w)

        return fwd
    xr = x.detach().clone().requires_grad_(True)
    wr = w.detach().clone().requires_grad_(True)

    def fwd_bwd() -> Any:
        xr.grad = None
        wr.grad = None
        y = fn(xr, wr)
        y.backward(gy)
        return y.detach(), xr.grad, wr.grad

    return fwd_bwd


def _rel_err(out: Any, ref: Any) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    err = 0.0
    for a, b in zip(outs, refs, strict=True):
        scale = float(b.abs().max()) or 1.0
        err = max(err, float((a - b).abs().max()) / scale)
    return err


def tensors(cfg: Config, channels_last: bool, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, cfg.c, cfg.h, cfg.w, generator=gen)
    # the kernel is a parameter, as in every layer (in inference the engine keeps a parameter's FFT spectrum)
    w = nn.Parameter(torch.randn(cfg.c, 1, cfg.kh, cfg.kw, generator=gen) / math.sqrt(cfg.kh * cfg.kw))
    gy = torch.randn(cfg.batch, cfg.c, cfg.h, cfg.w, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        gy = gy.contiguous(memory_format=torch.channels_last)
    return x, w, gy


def auto_choice(cfg: Config, x: Tensor, w: Tensor) -> str:
    if not cfg.training:
        with torch.inference_mode():
            return resolve_impl(x, w, None, cfg.padding, cfg.dilations)
    return resolve_impl(x.detach().requires_grad_(True), w.detach().requires_grad_(True), None,
                        cfg.padding, cfg.dilations)


def impls_for(cfg: Config, all_impls: bool) -> list[str]:
    out = ["native", "auto"]
    if all_impls:
        # blocked has no autograd; direct differs from channels_last only in its backward
        out += [i for i in EXTRA_IMPLS if i != ("blocked" if cfg.training else "direct")]
    return out


def _timed(call: Callable[[], Any]) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    call()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_config(cfg: Config, impls: list[str], args: argparse.Namespace, share_s: float | None,
                 measure_memory: bool = True) -> Result:
    """Warm up (first call measures memory), then time ``impls`` in interleaved rounds."""
    x, w, gy = tensors(cfg, args.channels_last_input, args.seed)
    res = Result(cfg, impls, auto_impl=auto_choice(cfg, x, w))
    calls = {impl: make_call(impl, cfg, x, w, gy) for impl in impls}
    est: dict[str, float] = {}
    ref = None
    for impl in impls:  # first call of each: correctness vs the first impl, and (optionally) peak memory
        if measure_memory:
            out, res.mem_mb[impl] = peak_extra_mb(calls[impl])
        else:
            out = calls[impl]()
        if impl == impls[0]:
            ref = out
        else:
            res.rel_err[impl] = _rel_err(out, ref)
        del out
    for impl in impls:  # warm calls (the memory probe handed pages back to the OS): time estimates
        est[impl] = _timed(calls[impl])[0]
        if est[impl] < args.slow_call:
            est[impl] = _timed(calls[impl])[0]
    del ref
    round_s = sum(est.values())
    rounds = args.repeats
    if share_s is not None:
        rounds = min(rounds, max(args.min_repeats, int(share_s / max(round_s, 1e-9))))
    if max(est.values()) > args.slow_call:
        rounds = min(rounds, args.min_repeats)
    elif round_s * rounds < args.min_time:  # fast ops: more rounds, for stabler medians and load gauge
        rounds = max(rounds, min(args.max_repeats, math.ceil(args.min_time / max(round_s, 1e-9))))
    res.times = {i: [] for i in impls}
    res.cpu = {i: [] for i in impls}
    gc.collect()
    gc.disable()
    res.other.start()
    try:
        for r in range(rounds):
            for j in range(len(impls)):
                impl = impls[(r + j) % len(impls)]
                wall, cpu = _timed(calls[impl])
                res.times[impl].append(wall)
                res.cpu[impl].append(cpu)
    finally:
        res.other.stop()
        gc.enable()
    res.rounds = rounds
    return res


def run_grid(grid: list[Config], args: argparse.Namespace, impls_fn: Callable[[Config], list[str]],
             measure_memory: bool = True) -> list[Result]:
    """Every configuration once; then, while the time budget lasts, configurations during whose timed calls
    other processes used more than ``--retry-above`` of the machine are re-run, keeping the less contended
    result."""
    results: list[Result] = []
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    waited = [0.0]

    def left() -> float | None:
        spent = time.perf_counter() - t_start - waited[0]
        return None if args.time_budget is None else args.time_budget - spent

    def settle() -> None:  # after a contended configuration: sleep until the machine is quiet again
        if waited[0] < args.wait_quiet:
            w = wait_for_quiet(args.retry_above, args.wait_quiet - waited[0])
            waited[0] += w
            print(f"waited {w:.0f} s for other processes to finish", file=sys.stderr, flush=True)

    def one(cfg: Config, share: float | None, tag: str) -> Result:
        t0 = time.perf_counter()
        res = bench_config(cfg, impls_fn(cfg), args, share, measure_memory)
        print(
            f"[{tag}] {cfg.pass_} b{cfg.batch} {cfg.shape_label} {cfg.kernel_label}: "
            + ", ".join(f"{k} {res.ms(k):.2f} ms" for k in res.impls)
            + f" ({res.rounds} rounds, CPU share {100 * res.share(threads):.0f}%, "
            f"others {100 * res.other.fraction():.0f}%, "
            f"{time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        return res

    for i, cfg in enumerate(grid):
        if results and results[-1].other.fraction() > args.retry_above:
            settle()
        budget = left()
        results.append(one(cfg, None if budget is None else max(0.0, budget) / (len(grid) - i),
                           f"{i + 1}/{len(grid)}"))
    for attempt in range(args.retries):
        todo = [i for i, r in enumerate(results) if r.other.fraction() > args.retry_above]
        if not todo:
            break
        print(f"re-running {len(todo)} contended configurations (pass {attempt + 1})", file=sys.stderr)
        for n, i in enumerate(todo):
            settle()
            budget = left()
            if budget is not None and budget <= 0:
                print("time budget spent", file=sys.stderr)
                return results
            res = one(results[i].config, None if budget is None else budget / (len(todo) - n),
                      f"retry {n + 1}/{len(todo)}")
            if res.other.fraction() < results[i].other.fraction():
                results[i] = res
    return results


# ------------------------------------------------------------------------------------------------ report
def _fmt_ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _fmt_mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def markdown(results: list[Result], meta: dict[str, Any], all_impls: bool) -> str:
    extra = [i for i in EXTRA_IMPLS if all_impls]
    lines = [
        header_line(meta),
        "",
        "| Pass | Batch | C@H×W | Kernel | auto runs | native (ms) | auto (ms) | × (native/auto) "
        + "".join(f"| {i} (ms) " for i in extra)
        + "| native peak (MB) | auto peak (MB) | rounds | others' CPU | max rel. err |",
        "|---|--:|---|---|---|--:|--:|--:|" + "--:|" * len(extra) + "--:|--:|--:|--:|--:|",
    ]
    for r in results:
        c = r.config
        ex = "".join(f"| {_fmt_ms(r.ms(i)) if i in r.times else '–'} " for i in extra)
        err = max(r.rel_err.values()) if r.rel_err else 0.0
        lines.append(
            f"| {c.pass_} | {c.batch} | {c.shape_label} | {c.kernel_label} | {r.auto_impl} "
            f"| {_fmt_ms(r.ms('native'))} | {_fmt_ms(r.ms('auto'))} | **{r.speedup():.1f}** {ex}"
            f"| {_fmt_mb(r.mem_mb.get('native'))} | {_fmt_mb(r.mem_mb.get('auto'))} | {r.rounds} "
            f"| {100 * r.other.fraction():.0f}% | {err:.0e} |"
        )
    rows = []
    for pass_, k, batch, target in TARGETS:
        batches = sorted({r.config.batch for r in results}) if batch is None else [batch]
        for b in batches:
            sel = [r for r in results if r.config.pass_ == pass_ and r.config.kernel_key == k and r.config.batch == b]
            if not sel:
                continue
            sp = [(r.speedup(), r.config.shape_label) for r in sel]
            lo = min(sp)
            geo = math.exp(statistics.mean(math.log(s) for s, _ in sp))
            rows.append(f"| {pass_} | {k}×{k} | {b} | ≥{target:g} | {lo[0]:.1f} ({lo[1]}) | {geo:.1f} "
                        f"| {'yes' if lo[0] >= target else 'no'} |")
    if rows:  # none when the grid holds no targeted (pass, kernel, batch), e.g. dilated kernels only
        lines += ["", "Targets (speed-up auto/native over the stage shapes run; met = the minimum reaches it):", ""]
        lines += ["| Pass | Kernel | Batch | Target | min × (shape) | geo-mean × | Met |",
                  "|---|---|--:|--:|--:|--:|---|", *rows]
    return "\n".join(lines)


def calibration_impls(cfg: Config) -> list[str]:
    return ["native", "channels_last", "direct", "fft"] if cfg.training else ["native", "channels_last", "fft"]


def calibrate_markdown(results: list[Result], meta: dict[str, Any]) -> str:
    lines = [
        header_line(meta),
        "",
        "| Pass | Batch | C@H×W | Kernel | cropped to | native ms | channels_last ms | est. | direct ms | est. "
        "| fft ms | est. | auto picks | fastest measured | cost of the pick (× best) |",
        "|---|--:|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|--:|",
    ]
    for r in results:
        c = r.config
        w = torch.empty(c.c, 1, c.kh, c.kw)
        wc, pc = crop_kernel_to_reach(w, (c.h, c.w), c.padding, c.dilations)
        kc = tuple(wc.shape[-2:])
        shape = (c.batch, c.c, c.h, c.w)
        timed = calibration_impls(c)
        est = {i: estimate_cost_ms(i, shape, kc, pc, c.training, c.dilations)
               for i in ("channels_last", "direct", "fft")}
        meas = {i: r.ms(i) for i in timed}
        best = min(meas, key=meas.__getitem__)
        pick = r.auto_impl
        cost = meas[pick] / meas[best] if pick in meas else float("nan")
        direct = (f"| {_fmt_ms(meas['direct'])} | {_fmt_ms(est['direct'])} " if "direct" in meas else "| – | – ")
        lines.append(
            f"| {c.pass_} | {c.batch} | {c.shape_label} | {c.kernel_label} | {kc[0]}×{kc[1]} "
            f"| {_fmt_ms(meas['native'])} | {_fmt_ms(meas['channels_last'])} | {_fmt_ms(est['channels_last'])} "
            f"{direct}| {_fmt_ms(meas['fft'])} | {_fmt_ms(est['fft'])} | {pick} | {best} | {cost:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--shapes", nargs="+", default=None, help=f"C@H[xW] (default {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--kernels", nargs="+", default=None,
                   help=f"K, KHxKW or with a dilation KdD / KHxKWdD (default {' '.join(DEFAULT_KERNELS)})")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 32)")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--all-impls", action="store_true", help="also time channels_last, fft, blocked, native_crop")
    p.add_argument("--calibrate", action="store_true",
                   help="print measured channels_last/fft times next to the cost model's estimates")
    p.add_argument("--channels-last-input", action="store_true", help="give every impl a channels-last input")
    p.add_argument("--repeats", type=int, default=None, help="max timed rounds per config (default 7; quick 2)")
    p.add_argument("--min-repeats", type=int, default=3, help="rounds for slow calls / tight budgets (default 3)")
    p.add_argument("--slow-call", type=float, default=1.0, metavar="SECONDS",
                   help="calls slower than this get one warm-up and --min-repeats rounds (default 1)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="spread this many seconds over the configurations (at least --min-repeats rounds each)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe calls")
    p.add_argument("--retries", type=int, default=2,
                   help="passes re-running contended configurations within the time budget (default 2)")
    p.add_argument("--retry-above", type=float, default=0.1, metavar="FRACTION",
                   help="re-run configurations during which other processes used more than this fraction "
                   "of the machine's CPU (default 0.1)")
    p.add_argument("--min-time", type=float, default=0.5, metavar="SECONDS",
                   help="fast configurations get more rounds until their timed calls last this long (default 0.5)")
    p.add_argument("--max-repeats", type=int, default=200, help="cap on those extra rounds (default 200)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="after a contended configuration, sleep until the machine is quiet again, up to this "
                   "many seconds in all (not counted in --time-budget; default 0 = never wait)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write results (raw timings) to this JSON file")
    p.add_argument("--no-space-to-batch", action="store_true",
                   help="run wide dilated kernels as dense zero-filled ones, not on sub-grids (the engine before it)")
    p.add_argument("--no-kernel-cache", action="store_true",
                   help="do not keep kernel spectra between inference calls (ops.set_fft_kernel_cache(False))")
    p.add_argument("--quick", action="store_true", help="smoke run (80@28 and 320@7, kernels 13 and 51, 2 rounds)")
    args = p.parse_args(argv)

    quick = args.quick
    shapes = args.shapes or (["80@28", "320@7"] if quick else DEFAULT_SHAPES)
    kernels = args.kernels or (["13", "51"] if quick else DEFAULT_KERNELS)
    batches = args.batch or ([4] if quick else [32] if args.calibrate else [1, 32])
    args.repeats = args.repeats or (2 if quick else 7)
    if quick:
        args.min_repeats = min(args.min_repeats, 2)

    torch.set_num_threads(args.threads)
    if args.no_space_to_batch:
        prof = cpu_profile()
        set_cpu_profile(dataclasses.replace(prof, name=f"{prof.name}-no-space-to-batch", space_to_batch_min_side=0))
    if args.no_kernel_cache:
        set_fft_kernel_cache(False)
    warn_malloc_env()
    grid = build_grid(shapes, kernels, batches, args.passes)
    if args.calibrate:
        results = run_grid(grid, args, calibration_impls, measure_memory=False)
    else:
        results = run_grid(grid, args, lambda c: impls_for(c, args.all_impls), not args.no_memory)
    threads = torch.get_num_threads()
    # calls under 5 ms mostly run on one thread, which says nothing about contention: gauge the others
    pairs = [(w, c) for r in results for i in r.times for w, c in zip(r.times[i], r.cpu[i], strict=True)]
    walls = [w for w, _ in pairs if w >= 0.005] or [w for w, _ in pairs]
    cpus = [c for w, c in pairs if w >= 0.005] or [c for _, c in pairs]
    total = OtherLoad()
    for r in results:
        total.busy_s += r.other.busy_s
        total.own_s += r.other.own_s
        total.wall_s += r.other.wall_s
    meta = base_meta(threads) | {
        "cpu_share": cpu_share(walls, cpus, threads),
        "other_load": total.fraction(),
        "channels_last_input": args.channels_last_input,
        "repeats_max": args.repeats,
        "min_repeats": args.min_repeats,
    }
    if args.calibrate:
        print(calibrate_markdown(results, meta))
    else:
        print(markdown(results, meta, args.all_impls))
    if args.json:
        out = {
            "meta": meta,
            "results": [
                {
                    "pass": r.config.pass_,
                    "batch": r.config.batch,
                    "shape": [r.config.c, r.config.h, r.config.w],
                    "kernel": [r.config.kh, r.config.kw],
                    "dilation": r.config.dilation,
                    "padding": list(r.config.padding),
                    "auto_impl": r.auto_impl,
                    "ms": {i: r.ms(i) for i in r.impls},
                    "speedup_auto_vs_native": r.speedup() if "native" in r.times else None,
                    "peak_extra_mb": r.mem_mb,
                    "max_rel_err_vs_first": r.rel_err,
                    "rounds": r.rounds,
                    "cpu_share": r.share(threads),
                    "other_load": r.other.fraction(),
                    "times_s": r.times,
                    "cpu_s": r.cpu,
                }
                for r in results
            ],
        }
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
