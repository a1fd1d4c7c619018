"""Helpers shared by the benchmark scripts (run-environment report, memory gauges, the official code path).

Nothing here is imported by the package. The scripts import it as ``_common`` when run as files
(``python benchmarks/x.py``) and as ``benchmarks._common`` when run as modules (``python -m benchmarks.x``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ run environment
def malloc_env_set() -> bool:
    """Whether glibc's malloc was told to keep freed memory (see ``docs/benchmarks.md``)."""
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def warn_malloc_env() -> None:
    if not malloc_env_set():
        print(
            "note: " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + " is not set; timings may "
            "include page-fault overhead",
            file=sys.stderr,
        )


def git_revision() -> str:
    """Short commit of the checkout, with ``+dirty`` when ``uniperception/`` has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "uniperception"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU's model name with the vector capability PyTorch dispatches to (e.g. ``AMD EPYC (AVX2)``)."""
    cap = str(torch.backends.cpu.get_cpu_capability())
    return f"{_cpu_model()} ({cap})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def base_meta(threads: int) -> dict[str, Any]:
    """Run-environment fields every benchmark reports."""
    import uniperception as up
    from uniperception.ops import cpu_profile

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dev dependency
        timm_version = "n/a"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "timm": timm_version,
        "uniperception": up.__version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_profile": cpu_profile().name,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "malloc_env_set": malloc_env_set(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def header_line(meta: dict[str, Any]) -> str:
    return (
        f"uniperception {meta['uniperception']} ({meta['git']}), torch {meta['torch']}, timm {meta['timm']}, "
        f"{meta['threads']} threads, {meta['cpu']}, engine cost profile {meta['cpu_profile']}, "
        f"{meta['date']}; malloc env set: "
        f"{'yes' if meta['malloc_env_set'] else 'NO'}; CPU share {100 * meta['cpu_share']:.0f}% "
        "(process CPU time / (wall time × threads) of the timed calls; ~100% = uncontended); "
        f"other processes used {100 * meta['other_load']:.0f}% of the machine's CPU meanwhile."
    )


def cpu_share(walls: list[float], cpus: list[float], threads: int) -> float:
    """Median over timed calls of CPU time / (wall time × threads): ~1 when the cores were ours alone."""
    shares = [c / (w * threads) for w, c in zip(walls, cpus, strict=True) if w > 0]
    return statistics.median(shares) if shares else float("nan")


class OtherLoad:
    """Gauge of the CPU that *other* processes used while this one ran (Linux ``/proc/stat``).

    ``start()`` and ``stop()`` bracket a measured stretch (they may be called repeatedly; the totals add up);
    :meth:`fraction` is (machine busy CPU time − this process's CPU time) / (wall time × CPUs): ~0 on a quiet
    machine, 0.5 when another process kept one of two cores busy. Independent of how well the measured op
    itself uses its threads (unlike the CPU share, which small ops keep low). NaN where /proc is missing.
    """

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.own_s = 0.0
        self.wall_s = 0.0
        self._t: tuple[float, float, float] | None = None

    @staticmethod
    def _machine_busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                parts = f.readline().split()
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal ...
        vals = [int(v) for v in parts[1:9]]
        busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + vals[7]
        return busy / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        busy = self._machine_busy_s()
        self._t = None if busy is None else (time.perf_counter(), busy, time.process_time())

    def stop(self) -> None:
        if self._t is None:
            return
        busy = self._machine_busy_s()
        if busy is not None:
            t0, b0, c0 = self._t
            self.wall_s += time.perf_counter() - t0
            self.busy_s += busy - b0
            self.own_s += time.process_time() - c0
        self._t = None

    def fraction(self) -> float:
        if self.wall_s <= 0:
            return float("nan")
        return max(0.0, (self.busy_s - self.own_s) / (self.wall_s * (os.cpu_count() or 1)))


def wait_for_quiet(threshold: float, max_wait_s: float, sample_s: float = 2.0) -> float:
    """Sleep until other processes use at most ``threshold`` of the machine's CPU in two consecutive
    ``sample_s`` windows, or ``max_wait_s`` has passed; returns the seconds waited (0 when ``max_wait_s`` ≤ 0).

    On a shared 2-core machine a third busy process slows a 2-thread run down 5-15× (OpenMP threads wait
    for each other), so waiting is cheaper than timing through it.
    """
    if max_wait_s <= 0:
        return 0.0
    t0 = time.perf_counter()
    ok = 0
    while True:
        gauge = OtherLoad()
        gauge.start()
        time.sleep(sample_s)
        gauge.stop()
        ok = ok + 1 if not gauge.fraction() > threshold else 0
        waited = time.perf_counter() - t0
        if ok >= 2 or waited >= max_wait_s:
            return waited


def timed_rounds(
    one_round: Callable[[int, OtherLoad], str],
    others: list[float],
    repeats: int,
    *,
    quiet_threshold: float,
    max_rounds: int,
    time_budget_s: float | None = None,
    wait_quiet_s: float = 0.0,
    min_rounds: int = 3,
) -> int:
    """Run timing rounds until ``repeats`` of them were quiet; returns the number of rounds done.

    ``one_round(r, load)`` times round ``r`` (interleaving the candidates, rotating which goes first), starting
    and stopping ``load`` around what it times, and returns text for the progress line. The other-process
    share of each round is appended to ``others``; a round is quiet when it is at most ``quiet_threshold``.
    Rounds stop after ``max_rounds`` or, with ``time_budget_s``, once that many seconds of rounds have passed
    (``min_rounds`` are always done). After a contended round it sleeps until the machine is quiet again, up
    to ``wait_quiet_s`` seconds in all (not counted in the budget). The garbage collector is off meanwhile.
    """
    gc.collect()
    gc.disable()
    try:
        t_start = time.perf_counter()
        done = quiet = 0
        waited = 0.0
        while quiet < repeats and done < max_rounds:
            spent = time.perf_counter() - t_start - waited
            if time_budget_s is not None and done >= min_rounds and spent > time_budget_s:
                print(f"time budget spent after {done} rounds", file=sys.stderr, flush=True)
                break
            if others and others[-1] > quiet_threshold and waited < wait_quiet_s:
                w = wait_for_quiet(quiet_threshold, wait_quiet_s - waited)
                waited += w
                print(f"waited {w:.0f} s for other processes to finish", file=sys.stderr, flush=True)
            t_round = time.perf_counter()
            load = OtherLoad()
            extra = one_round(done, load)
            others.append(load.fraction())
            quiet += not others[-1] > quiet_threshold
            done += 1
            print(
                f"round {done} done in {time.perf_counter() - t_round:.1f} s ({extra + '; ' if extra else ''}"
                f"other processes {100 * others[-1]:.0f}%; {quiet}/{repeats} quiet rounds)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        gc.enable()
    return done


def quiet_rounds(others: list[float], threshold: float, min_rounds: int = 3) -> list[int]:
    """Indices of the rounds during which other processes used at most ``threshold`` of the machine.

    All rounds when fewer than ``min_rounds`` qualify (the report then says the run was contended).
    """
    idx = [i for i, f in enumerate(others) if not f > threshold]  # NaN (no /proc) counts as quiet
    return idx if len(idx) >= min_rounds else list(range(len(others)))


def rounds_note(meta: dict[str, Any]) -> str:
    """How many rounds the statistics use, for the report's header line."""
    thr = 100 * meta["quiet_threshold"]
    if meta.get("contended"):
        return (f"medians over all {meta['rounds_used']} rounds — fewer than 3 had other processes "
                f"≤{thr:.0f}% of the CPU, so the numbers are NOT reliable;")
    return f"medians over the {meta['rounds_used']} quiet rounds (other processes ≤{thr:.0f}% of the CPU);"


# ------------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident set size (MB), Linux only."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    """Resident high-water mark of this process (MB, ``VmHWM``), Linux only."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


_LIBC: Any = None


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim(0)``; no-op elsewhere).

    With ``MALLOC_TRIM_THRESHOLD_`` set high, freed memory otherwise stays resident and a later peak-RSS
    reading would not see new allocations that reuse it.
    """
    global _LIBC
    gc.collect()
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def peak_extra_mb(fn: Any) -> tuple[Any, float | None]:
    """Run ``fn()`` once and return its result and the approximate peak extra RSS it caused (MB).

    Frees what can be freed, resets the high-water mark, reads VmRSS, runs ``fn``, and returns
    VmHWM − VmRSS(before). Approximate: allocator caching, threads' arenas and page granularity blur it.
    """
    release_free_memory()
    before = rss_mb()
    ok = reset_peak_rss()
    out = fn()
    peak = peak_rss_mb()
    if not ok or before is None or peak is None:
        return out, None
    return out, max(0.0, peak - before)


# ------------------------------------------------------------------------------------------------ models
def randomize_state(model: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorms non-trivial statistics and layer scales / GRN parameters non-trivial values.

    At init these are identity-like (layer scale 1e-6, GRN zeros, BN mean 0 / var 1), which would make
    equivalence checks vacuous; the values do not affect speed.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma", "beta"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def official_grn(grn: nn.Module, x: Tensor) -> Tensor:
    """ConvNeXt-V2 / UniRepLKNet ``GRNwithNHWC.forward``, verbatim from the official code (NHWC input)."""
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    if grn.beta is not None:
        return (grn.gamma * nx + 1) * x + grn.beta
    return (grn.gamma * nx + 1) * x


def official_residual(self: nn.Module, x: Tensor) -> Tensor:
    """The official ``UniRepLKNetBlock.compute_residual`` (NHWC Linears on permuted views, torch.norm GRN)."""
    y = self.se(self.norm(self.dwconv(x)))
    y = self.pwconv1(y)  # Permute(0, 2, 3, 1) + Linear
    y = official_grn(self.act[1], self.act[0](y))  # GELU, GRN on NHWC
    y = self.pwconv2(y)  # Linear + Permute(0, 3, 1, 2) [+ BatchNorm2d in training form]
    if self.gamma is not None:
        y = self.gamma.view(1, -1, 1, 1) * y
    return self.drop_path(y)


def official_layernorm2d(self: nn.Module, x: Tensor) -> Tensor:
    """The official channels-first ``LayerNorm`` formula (explicit mean and variance over dim 1)."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


def make_official(model: nn.Module) -> nn.Module:
    """Switch a UniRepLKNet, in place, to a faithful re-creation of the official code path.

    * NCHW activations (``model.channels_last = False``);
    * every depthwise conv is a plain ``nn.Conv2d.forward`` (``F.conv2d`` as called: no kernel cropping, no
      dispatch; ``set_conv_impl("native")`` is also applied so the setting reads "native");
    * every block's ``residual`` is the official formulation (:func:`official_residual`);
    * every channels-first LayerNorm uses the official explicit formula.

    Same modules, parameters and maths, so outputs agree with the engine to float rounding.
    """
    from uniperception.layers.norm import LayerNorm2d
    from uniperception.layers.unireplknet_block import UniRepLKNetBlock
    from uniperception.ops import DepthwiseConv2d

    model.channels_last = False
    model.set_conv_impl("native")
    for m in model.modules():
        if isinstance(m, UniRepLKNetBlock):
            m.residual = types.MethodType(official_residual, m)
        elif isinstance(m, DepthwiseConv2d):
            m.forward = types.MethodType(nn.Conv2d.forward, m)
        elif isinstance(m, LayerNorm2d):
            m.forward = types.MethodType(official_layernorm2d, m)
    return model


def write_json(path: str, obj: Any) -> None:
    """Write a benchmark's ``--json`` result (indented) and say so on stderr."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)
