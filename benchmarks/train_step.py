"""CPU speed and memory of a full UniRepLKNet training step: official code path vs the engine.

A training step is forward + cross-entropy loss + backward + ``AdamW.step()`` (+ ``zero_grad``) on a
``--batch`` × 3 × ``--img-size``² batch (default 32 × 224², 1000 classes, random labels), model in
``train()`` mode (BatchNorms use batch statistics). For every UniRepLKNet variant asked for (default A only;
``--models a f p n`` for more) the same initial weights run in these modes:

* ``official``: a faithful re-creation of the official code path on the same modules: NCHW activations
  (``model.channels_last = False``), every depthwise conv a plain ``nn.Conv2d.forward`` (``F.conv2d`` as
  called, no kernel cropping), every block's residual the official formulation (NHWC ``Linear``s on
  permuted views, GRN with ``torch.norm(x, p=2, dim=(1, 2))``), official channels-first LayerNorm formula
  (see ``benchmarks/_common.py``);
* ``engine-native-conv``: this package's block code (channels-last, 1×1 convs, GEMM GRN) with
  ``set_conv_impl("native")``, i.e. the block-level work without the convolution engine;
* ``engine-no-direct``: the package defaults, except that the cost model may not pick the ``direct``
  implementation (hand-written depthwise backward), i.e. what the engine did before it existed;
* ``engine``: the package defaults (``impl="auto"``);
* ``engine+cp``: the defaults with ``model.set_grad_checkpointing(True)``.

Before timing, BatchNorm affine parameters, layer scales and GRN parameters are randomised (so the check is
not vacuous) and the first step's loss of every mode is checked against ``official`` on the same batch
(≤1e-4 relative). Modes are then timed round-robin (one step each per round, starting mode rotating),
after ``--warmup`` untimed steps each; ms/step is the median over rounds and a speed-up is the median of
per-round ratios. The share of the machine's CPU used by other processes is measured in every round
(``/proc/stat``); rounds go on until ``--repeats`` of them were below ``--quiet-threshold`` (or
``--max-rounds`` / ``--time-budget`` stop them), and the statistics use only those quiet rounds when at
least three exist. ``--wait-quiet`` makes it sleep through other jobs instead of timing through them. Peak RSS is measured per mode in a fresh subprocess (a high-water mark is per process):
VmHWM after three steps (the first allocates AdamW's state), reported in total and above the RSS of the
process once the model and optimizer exist. ``--no-memory`` skips it.

Run with glibc's malloc told to keep freed memory (the report says whether it was)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        .venv/bin/python benchmarks/train_step.py --repeats 8 --time-budget 400 --wait-quiet 1800 --json out.json

``--quick`` is a smoke run (A, batch 4, 112², 2 rounds). Markdown goes to stdout, progress to stderr.
Nothing is asserted about wall times.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import uniperception as up

try:
    from _common import (
        OtherLoad,
        base_meta,
        cpu_share,
        header_line,
        make_official,
        peak_rss_mb,
        quiet_rounds,
        randomize_state,
        release_free_memory,
        reset_peak_rss,
        rounds_note,
        rss_mb,
        wait_for_quiet,
        warn_malloc_env,
        write_json,
    )
except ImportError:  # run as ``python -m benchmarks.train_step``
    from benchmarks._common import (
        OtherLoad,
        base_meta,
        cpu_share,
        header_line,
        make_official,
        peak_rss_mb,
        quiet_rounds,
        randomize_state,
        release_free_memory,
        reset_peak_rss,
        rounds_note,
        rss_mb,
        wait_for_quiet,
        warn_malloc_env,
        write_json,
    )

MODES = ("official", "engine-native-conv", "engine-no-direct", "engine", "engine+cp")
LOSS_RTOL = 1e-4


@dataclass
class Run:
    """One (architecture, mode): the model, its optimizer and the measurements."""

    arch: str
    mode: str
    model: nn.Module
    opt: torch.optim.Optimizer
    step_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    step_faults: list[int] = field(default_factory=list)  # minor page faults during each timed step
    step_sys_s: list[float] = field(default_factory=list)  # system (kernel) CPU time of each timed step
    losses: list[float] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    use: list[int] = field(default_factory=list)  # rounds the statistics use (the uncontended ones)

    @property
    def key(self) -> str:
        return f"{self.arch} / {self.mode}"

    def _used(self, values: list) -> list:
        """``values`` (one per timed step) of the rounds the statistics use."""
        return [values[i] for i in self.use] if self.use else values

    def times(self) -> list[float]:
        return self._used(self.step_s)

    def ms(self) -> float:
        return 1e3 * statistics.median(self.times())

    def faults(self) -> float:
        return statistics.median(self._used(self.step_faults))

    def sys_ms(self) -> float:
        return 1e3 * statistics.median(self._used(self.step_sys_s))

    def iqr_pct(self) -> float:
        t = self.times()
        if len(t) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(t, n=4)
        return 100.0 * (q3 - q1) / statistics.median(t)


def _arch_name(v: str) -> str:
    v = v.strip().lower()
    return v if v.startswith("unireplknet_") else f"unireplknet_{v}"


def build_base(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = up.create_model(arch)
    randomize_state(model, torch.Generator().manual_seed(seed))
    return model


def configure(model: nn.Module, mode: str) -> nn.Module:
    """Put a (copied) model into one of :data:`MODES`."""
    if mode == "official":
        make_official(model)
    elif mode == "engine-native-conv":
        model.set_conv_impl("native")
    elif mode == "engine-no-direct":
        model.set_conv_impl("auto")
        _exclude_direct(model)
    elif mode == "engine":
        model.set_conv_impl("auto")
    elif mode == "engine+cp":
        model.set_conv_impl("auto")
        model.set_grad_checkpointing(True)
    else:
        raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
    return model.train()


def _exclude_direct(model: nn.Module) -> None:
    """Run this model's forward passes (where the per-layer choices are locked) with a cost model that
    never picks ``direct``; the backward passes never consult the cost model."""
    from uniperception.ops import cpu_profile, set_cpu_profile

    profile = dataclasses.replace(cpu_profile(), direct_training=False)
    model.register_forward_pre_hook(lambda *_: set_cpu_profile(profile))
    model.register_forward_hook(lambda *_: set_cpu_profile(None))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # PyTorch's default AdamW implementation for CPU tensors in every mode (same optimizer cost for all)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)


def batch(batch_size: int, img_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    y = torch.randint(0, 1000, (batch_size,), generator=gen)
    return x, y


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def timed_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> None:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = time.process_time(), time.perf_counter()
    run.losses.append(train_step(run.model, run.opt, x, y))
    run.step_s.append(time.perf_counter() - t0)
    run.step_cpu_s.append(time.process_time() - c0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    run.step_faults.append(r1.ru_minflt - r0.ru_minflt)
    run.step_sys_s.append(r1.ru_stime - r0.ru_stime)


def conv_choices(model: nn.Module) -> dict[str, int]:
    """How many depthwise convs locked which implementation (after a training step)."""
    from uniperception.ops import DepthwiseConv2d

    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, DepthwiseConv2d):
            k = m.locked_impl or m.impl
            k = f"{k} {m.kernel_size[0]}×{m.kernel_size[1]}"
            out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------ memory
def probe_memory(arch: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS of three training steps of one mode."""
    torch.set_num_threads(args.threads)
    model = configure(build_base(arch, args.seed), mode)
    opt = make_optimizer(model, args.lr)
    x, y = batch(args.batch, args.img_size, args.seed)
    release_free_memory()
    before = rss_mb()
    reset_peak_rss()
    for _ in range(3):
        train_step(model, opt, x, y)
    peak = peak_rss_mb()
    return {"rss_before_mb": before, "peak_rss_mb": peak,
            "peak_extra_mb": None if peak is None or before is None else peak - before}


def measure_memory(arch: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--_probe", mode, "--models", arch,
        "--batch", str(args.batch), "--img-size", str(args.img_size), "--threads", str(args.threads),
        "--seed", str(args.seed), "--lr", str(args.lr),
    ]
    print(f"memory probe {arch} / {mode}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return {"error": f"probe exited with {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ timing
def run_timing(runs: list[Run], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, warmup: int,
               others: list[float]) -> int:
    """Warm up, then time interleaved rounds until ``args.repeats`` of them were uncontended (other processes
    ≤ ``args.quiet_threshold`` of the CPU), ``args.max_rounds`` were done, or ``args.time_budget`` is spent
    (at least 3 rounds); appends the other processes' load of each round to ``others``. Returns the rounds done.
    """
    for w in range(warmup):
        print(f"warm-up round {w + 1}/{warmup}", file=sys.stderr, flush=True)
        for r in runs:
            train_step(r.model, r.opt, x, y)
    gc.collect()
    gc.disable()
    done = quiet = 0
    waited = 0.0
    try:
        t_start = time.perf_counter()
        n = len(runs)
        while quiet < args.repeats and done < args.max_rounds:
            spent = time.perf_counter() - t_start - waited
            if args.time_budget is not None and done >= 3 and spent > args.time_budget:
                print(f"time budget spent after {done} rounds", file=sys.stderr, flush=True)
                break
            if others and others[-1] > args.quiet_threshold and waited < args.wait_quiet:
                w = wait_for_quiet(args.quiet_threshold, args.wait_quiet - waited)
                waited += w
                print(f"waited {w:.0f} s for other processes to finish", file=sys.stderr, flush=True)
            t_round = time.perf_counter()
            load = OtherLoad()
            load.start()
            for i in range(n):
                timed_step(runs[(done + i) % n], x, y)
            load.stop()
            others.append(load.fraction())
            quiet += not others[-1] > args.quiet_threshold
            done += 1
            print(f"round {done} done in {time.perf_counter() - t_round:.1f} s (other processes "
                  f"{100 * others[-1]:.0f}%; {quiet}/{args.repeats} quiet rounds)", file=sys.stderr, flush=True)
    finally:
        gc.enable()
    return done


def _half_iqr(run: Run) -> str:
    """Half the IQR as ``±N%``, or ``n/a`` below the four rounds an IQR needs."""
    iqr = run.iqr_pct()
    return "n/a" if math.isnan(iqr) else f"±{iqr / 2:.0f}%"


def paired_speedup(run: Run, ref: Run) -> float:
    return statistics.median(r / m for r, m in zip(ref.times(), run.times(), strict=True))


def markdown(runs: list[Run], checks: dict[str, dict[str, float]], choices: dict[str, dict[str, int]],
             meta: dict[str, Any]) -> str:
    b = meta["batch"]
    lines = [
        header_line(meta) + f" {meta['repeats']} interleaved rounds; " + rounds_note(meta),
        "",
        f"| Model | Mode | ms / step (b{b}) | IQR | img/s | × official | × engine-native-conv "
        "| Peak RSS (GB) | Peak above model+opt (GB) | page faults / step | system ms / step |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by_key = {r.key: r for r in runs}
    for r in runs:
        off = by_key.get(f"{r.arch} / official")
        enc = by_key.get(f"{r.arch} / engine-native-conv")
        so = f"{paired_speedup(r, off):.2f}" if off is not None and off is not r else ""
        se = f"{paired_speedup(r, enc):.2f}" if enc is not None and enc is not r else ""
        mem = r.memory
        pk = f"{mem['peak_rss_mb'] / 1024:.2f}" if mem.get("peak_rss_mb") else "n/a"
        px = f"{mem['peak_extra_mb'] / 1024:.2f}" if mem.get("peak_extra_mb") else "n/a"
        lines.append(
            f"| {r.arch} | {r.mode} | {r.ms():.0f} | {_half_iqr(r)} | {1e3 * b / r.ms():.1f} "
            f"| {so} | {se} | {pk} | {px} | {r.faults():.0f} | {r.sys_ms():.0f} |"
        )
    lines += ["", "IQR: half the inter-quartile range of the per-round step times, relative to the median. "
              "Speed-ups are medians of per-round ratios (> 1 = faster). Page faults (minor, `getrusage`) and "
              "system CPU time: medians over the same steps; many faults mean freed memory was not reused and "
              "fresh pages were touched (see `benchmarks/alloc_reuse.py`)."]
    for arch, c in checks.items():
        lines.append(
            f"\nLoss check {arch} (first step, same batch and weights): official {c['official']:.6f}; "
            + ", ".join(f"{m} rel. Δ {d:.1e}" for m, d in c["rel_diff"].items())
            + f" (limit {LOSS_RTOL:g})."
        )
    for arch, ch in choices.items():
        lines.append(f"Depthwise convs in `engine` ({arch}), impl × kernel: "
                     + ", ".join(f"{k}: {v}" for k, v in ch.items()) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--models", nargs="+", default=None,
                   help="UniRepLKNet variants (a f p n, or unireplknet_a …); default a")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32; quick 4)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default 224; quick 112)")
    p.add_argument("--repeats", type=int, default=None,
                   help="uncontended timed rounds wanted (default 10; quick 2)")
    p.add_argument("--max-rounds", type=int, default=None, help="cap on timed rounds (default 3 × --repeats)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new timed round after this many seconds (at least 3 rounds)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode peak-RSS subprocesses")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="after a contended round, sleep until the machine is quiet again, up to this many "
                   "seconds in all (not counted in --time-budget; default 0 = never wait)")
    p.add_argument("--quiet-threshold", type=float, default=0.1, metavar="FRACTION",
                   help="statistics use only rounds during which other processes used at most this fraction "
                   "of the machine's CPU, if at least 3 such rounds exist (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write results (raw timings) to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke run (A, batch 4, 112², 2 rounds)")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    quick = args.quick
    args.batch = args.batch or (4 if quick else 32)
    args.img_size = args.img_size or (112 if quick else 224)
    args.repeats = args.repeats or (2 if quick else 10)
    args.max_rounds = args.max_rounds or 3 * args.repeats
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    archs = [_arch_name(n) for v in (args.models or ["a"]) for n in v.split(",") if n.strip()]

    if args._probe:
        print(json.dumps(probe_memory(archs[0], args._probe, args)))
        return 0

    torch.set_num_threads(args.threads)
    warn_malloc_env()
    x, y = batch(args.batch, args.img_size, args.seed)
    runs: list[Run] = []
    checks: dict[str, dict[str, Any]] = {}
    choices: dict[str, dict[str, int]] = {}
    for arch in archs:
        print(f"building {arch}", file=sys.stderr, flush=True)
        base = build_base(arch, args.seed)
        arch_runs = []
        for mode in args.modes:
            model = configure(copy.deepcopy(base), mode)
            arch_runs.append(Run(arch, mode, model, make_optimizer(model, args.lr)))
        # first step of every mode on the same batch and weights: the losses must agree
        first = {r.mode: train_step(r.model, r.opt, x, y) for r in arch_runs}
        ref_mode = "official" if "official" in first else arch_runs[0].mode
        ref = first[ref_mode]
        rel = {m: abs(v - ref) / abs(ref) for m, v in first.items() if m != ref_mode}
        checks[arch] = {ref_mode: ref, "rel_diff": rel}
        bad = {m: d for m, d in rel.items() if d > LOSS_RTOL}
        if bad:
            raise SystemExit(f"{arch}: first-step loss differs from {ref_mode} beyond {LOSS_RTOL}: {bad}")
        for r in arch_runs:
            if r.mode == "engine":
                choices[arch] = conv_choices(r.model)
        runs.extend(arch_runs)
        del base

    if not args.no_memory:
        for r in runs:
            r.memory = measure_memory(r.arch, r.mode, args)

    others: list[float] = []
    repeats = run_timing(runs, x, y, args, max(0, warmup - 1), others)
    use = quiet_rounds(others, args.quiet_threshold)
    for r in runs:
        r.use = use
    threads = torch.get_num_threads()
    meta = base_meta(threads) | {
        "batch": args.batch,
        "img_size": args.img_size,
        "repeats": repeats,
        "warmup": warmup,
        "cpu_share": cpu_share([r.step_s[i] for r in runs for i in use],
                               [r.step_cpu_s[i] for r in runs for i in use], threads),
        "other_load": statistics.median(others[i] for i in use),
        "other_load_per_round": others,
        "rounds_used": len(use),
        "contended": sum(not f > args.quiet_threshold for f in others) < 3,
        "quiet_threshold": args.quiet_threshold,
    }
    print(markdown(runs, checks, choices, meta))
    if args.json:
        by_key = {r.key: r for r in runs}
        out = {
            "meta": meta,
            "loss_check": checks,
            "engine_conv_choices": choices,
            "runs": [
                {
                    "arch": r.arch,
                    "mode": r.mode,
                    "ms_per_step": r.ms(),
                    "img_per_s": 1e3 * args.batch / r.ms(),
                    "speedup_vs_official": (paired_speedup(r, by_key[f"{r.arch} / official"])
                                            if f"{r.arch} / official" in by_key else None),
                    "memory": r.memory,
                    "step_s": r.step_s,
                    "step_cpu_s": r.step_cpu_s,
                    "step_minor_faults": r.step_faults,
                    "step_sys_s": r.step_sys_s,
                    "losses": r.losses,
                }
                for r in runs
            ],
        }
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
