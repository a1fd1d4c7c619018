"""CPU speed of the UniRepLKNet backbones, training form vs deploy form, next to timm's ConvNeXt.

For every UniRepLKNet variant asked for (default A/F/P/N) the script builds the model in training form
(BatchNorms and parallel dilated branches, run in eval mode) and a deep copy converted with
``reparameterize()`` (deploy form, same outputs), plus timm's ConvNeXt of similar FLOPs
(atto/femto/pico/nano, ``pretrained=False``, eval). In one run it measures, side by side:

* throughput (images/s) of a ``--batch`` × 3 × ``--img-size``² forward pass (default 32 × 224²);
* batch-1 latency (ms);
* FLOPs, as GMACs = FLOPs / 2 / 1e9 from ``torch.utils.flop_counter.FlopCounterMode`` (which counts only
  convolutions and matrix products, 2 FLOPs per MAC), and the parameter count (millions);
* speed ratios (> 1 means faster than the reference): deploy vs training form of each variant, and each
  UniRepLKNet form vs its ConvNeXt pair (A↔atto, F↔femto, P↔pico, N↔nano).

Everything runs under ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)`` (default 2).
The machines are shared and noisy, so the models first go through untimed warm-up rounds and are then
timed round-robin: each repeat (round) times every model once at batch ``--batch`` and
``--latency-iters`` times at batch 1, and the starting model rotates from round to round. Throughput
and latency are medians over the rounds; a ratio is the median over rounds of the per-round ratio (both
models measured seconds apart).
Nothing is asserted about wall times.

Page faults are expensive on the project VMs; run with glibc's malloc told to keep freed memory::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        .venv/bin/python benchmarks/backbone_speed.py --repeats 30 --time-budget 600 --json out.json

(the report says whether those variables were set; ``--time-budget`` caps the timed rounds when the
machine is busy, and the report gives the number of rounds actually done). Before timing, BatchNorm statistics, layer scales
and GRN parameters of the UniRepLKNet models are randomised (values do not change the speed) and the
deploy form is checked against the training form on one image. ``--quick`` is a smoke run (A and atto
only unless ``--models`` is given, batch 8, 3 rounds). The markdown table goes to stdout, progress to
stderr.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import uniperception as up

CONVNEXT_PAIR = {
    "unireplknet_a": "convnext_atto",
    "unireplknet_f": "convnext_femto",
    "unireplknet_p": "convnext_pico",
    "unireplknet_n": "convnext_nano",
}
DEFAULT_MODELS = [*CONVNEXT_PAIR, *CONVNEXT_PAIR.values()]
QUICK_MODELS = ["unireplknet_a", "convnext_atto"]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
FORMS = ("training", "deploy")


@dataclass
class Entry:
    """One benchmarked model (an architecture in one form) and its measurements."""

    arch: str
    form: str  # "training" / "deploy" for UniRepLKNet, "-" for timm models
    model: nn.Module
    params_m: float = 0.0
    gmacs: float = 0.0
    batch_s: list[float] = field(default_factory=list)  # one batch forward per round
    batch_cpu_s: list[float] = field(default_factory=list)  # process CPU time of those forwards
    latency_s: list[list[float]] = field(default_factory=list)  # batch-1 forwards, a list per round

    @property
    def key(self) -> str:
        return self.arch if self.form == "-" else f"{self.arch} ({self.form})"

    def throughput(self, batch: int) -> float:
        return batch / statistics.median(self.batch_s)

    def throughput_iqr_pct(self) -> float:
        """Inter-quartile range of the per-round batch times, in % of their median (a noise gauge)."""
        if len(self.batch_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.batch_s, n=4)
        return 100.0 * (q3 - q1) / statistics.median(self.batch_s)

    def latency_ms(self) -> float:
        return 1e3 * statistics.median(t for rnd in self.latency_s for t in rnd)


@dataclass
class Ratio:
    """Speed of ``model`` relative to ``ref``: > 1 means ``model`` is faster."""

    model: str
    ref: str
    kind: str  # "deploy vs training" or "vs ConvNeXt"
    throughput: float
    latency: float


# ------------------------------------------------------------------------------------------------ building
def _parse_models(values: list[str] | None, quick: bool) -> list[str]:
    if not values:
        return list(QUICK_MODELS if quick else DEFAULT_MODELS)
    names: list[str] = []
    for v in values:
        names.extend(n.strip() for n in v.split(",") if n.strip())
    return list(dict.fromkeys(names))


def _randomize_state(model: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorms non-trivial statistics and layer scales / GRN parameters non-trivial values.

    At init these are identity-like (layer scale 1e-6, GRN zeros, BN mean 0 / var 1), which would make the
    deploy-vs-training equivalence check vacuous; the values do not affect speed.
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


def build_entries(names: list[str], forms: list[str], img_size: int, seed: int) -> tuple[list[Entry], dict]:
    """Build every model; returns the entries and, per UniRepLKNet arch, the deploy-vs-training max |Δ|."""
    up_names = set(up.list_models())
    entries: list[Entry] = []
    checks: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(1, 3, img_size, img_size, generator=gen)
    for name in names:
        print(f"building {name}", file=sys.stderr, flush=True)
        if name in up_names:
            torch.manual_seed(seed)
            train = up.create_model(name).eval()
            if not hasattr(train, "reparameterize"):
                entries.append(Entry(name, "-", train))
                continue
            _randomize_state(train, gen)
            deploy = copy.deepcopy(train).reparameterize().eval()
            with torch.inference_mode():
                ref, out = train(probe), deploy(probe)
            checks[name] = {
                "max_abs_diff": float((ref - out).abs().max()),
                "max_abs_output": float(ref.abs().max()),
            }
            if "training" in forms:
                entries.append(Entry(name, "training", train))
            if "deploy" in forms:
                entries.append(Entry(name, "deploy", deploy))
        else:
            try:
                import timm
            except ImportError as e:  # pragma: no cover - timm is a dev dependency
                raise SystemExit(f"{name!r} is not a uniperception model and timm is not installed") from e
            if not timm.is_model(name):
                raise SystemExit(f"unknown model {name!r} (neither uniperception nor timm)")
            torch.manual_seed(seed)
            entries.append(Entry(name, "-", timm.create_model(name, pretrained=False).eval()))
    for e in entries:
        e.params_m = sum(p.numel() for p in e.model.parameters()) / 1e6
        e.gmacs = count_gmacs(e.model, img_size)
    return entries, checks


def count_gmacs(model: nn.Module, img_size: int) -> float:
    """GMACs of one 3×``img_size``² image (FlopCounterMode counts 2 FLOPs per multiply-accumulate).

    Models with ``set_conv_impl`` are counted on a copy switched to the native (``nn.Conv2d``) depthwise
    convolution, so that the count describes the network and not the convolution engine chosen.
    """
    if hasattr(model, "set_conv_impl"):
        model = copy.deepcopy(model)
        model.set_conv_impl("native")
    x = torch.randn(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


# ------------------------------------------------------------------------------------------------ timing
def _timed(model: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def _timed_cpu(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Wall and process CPU seconds of one forward."""
    c0, t0 = time.process_time(), time.perf_counter()
    model(x)
    return time.perf_counter() - t0, time.process_time() - c0


def cpu_share(entries: list[Entry], threads: int) -> float:
    """Median over the timed batch forwards of CPU time / (wall time × threads).

    About 1 when the benchmark had its cores to itself; well below 1 when other processes competed.
    """
    shares = [c / (w * threads) for e in entries for w, c in zip(e.batch_s, e.batch_cpu_s, strict=True)]
    return statistics.median(shares) if shares else float("nan")


def run_benchmark(
    entries: list[Entry],
    batch: int,
    img_size: int,
    repeats: int,
    warmup: int,
    latency_iters: int,
    seed: int,
    time_budget_s: float | None = None,
) -> int:
    """Warm up, then time ``repeats`` interleaved rounds; returns the number of rounds done.

    With ``time_budget_s``, no new round starts once that many seconds of timed rounds have passed
    (at least 3 rounds are always done).
    """
    gen = torch.Generator().manual_seed(seed + 1)
    xb = torch.randn(batch, 3, img_size, img_size, generator=gen)
    x1 = torch.randn(1, 3, img_size, img_size, generator=gen)
    with torch.inference_mode():
        for w in range(warmup):  # untimed rounds, in the same round-robin pattern as the timed ones
            print(f"warm-up round {w + 1}/{warmup}", file=sys.stderr, flush=True)
            for e in entries:
                e.model(xb)
                for _ in range(latency_iters):
                    e.model(x1)
        gc.collect()
        gc.disable()
        try:
            n = len(entries)
            t_start = time.perf_counter()
            done = 0
            for r in range(repeats):
                if time_budget_s is not None and r >= 3 and time.perf_counter() - t_start > time_budget_s:
                    print(f"time budget spent after {r} rounds", file=sys.stderr, flush=True)
                    break
                t_round = time.perf_counter()
                for i in range(n):  # round-robin over all models; the first one rotates per round
                    e = entries[(r + i) % n]
                    wall, cpu = _timed_cpu(e.model, xb)
                    e.batch_s.append(wall)
                    e.batch_cpu_s.append(cpu)
                    e.latency_s.append([_timed(e.model, x1) for _ in range(latency_iters)])
                print(
                    f"round {r + 1}/{repeats} done in {time.perf_counter() - t_round:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                done = r + 1
        finally:
            gc.enable()
    return done


def _paired_ratio(model: Entry, ref: Entry) -> Ratio:
    thr = statistics.median(rb / mb for rb, mb in zip(ref.batch_s, model.batch_s, strict=True))
    lat = statistics.median(
        statistics.median(rl) / statistics.median(ml)
        for rl, ml in zip(ref.latency_s, model.latency_s, strict=True)
    )
    kind = "deploy vs training" if model.arch == ref.arch else "vs ConvNeXt"
    return Ratio(model.key, ref.key, kind, thr, lat)


def compute_ratios(entries: list[Entry]) -> list[Ratio]:
    by_key = {e.key: e for e in entries}
    ratios: list[Ratio] = []
    for e in entries:
        if e.form == "deploy" and f"{e.arch} (training)" in by_key:
            ratios.append(_paired_ratio(e, by_key[f"{e.arch} (training)"]))
    for e in entries:
        pair = CONVNEXT_PAIR.get(e.arch)
        if e.form != "-" and pair in by_key:
            ratios.append(_paired_ratio(e, by_key[pair]))
    return ratios


# ------------------------------------------------------------------------------------------------ report
def markdown(
    entries: list[Entry], ratios: list[Ratio], checks: dict[str, dict[str, float]], meta: dict[str, Any]
) -> str:
    b = meta["batch"]
    s = meta["img_size"]
    vs_train = {r.model: r.throughput for r in ratios if r.kind == "deploy vs training"}
    vs_cnx = {r.model: (r.throughput, r.ref) for r in ratios if r.kind == "vs ConvNeXt"}
    lines = [
        f"uniperception {meta['uniperception']} ({meta['git']}), torch {meta['torch']}, timm {meta['timm']}, "
        f"{meta['threads']} threads, {meta['cpu']}, "
        f"{meta['date']}; malloc env set: {'yes' if meta['malloc_env_set'] else 'NO'}; "
        f"{meta['repeats']} interleaved rounds, medians; CPU share {100 * meta['cpu_share']:.0f}% "
        "(process CPU time / (wall time × threads) of the timed batch forwards; ~100% = uncontended).",
        "",
        f"| Model | Form | Params (M) | GMACs | Throughput b{b} (img/s) | IQR | Latency b1 (ms) "
        "| × training (thr) | × ConvNeXt pair (thr) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for e in entries:
        t = f"{vs_train[e.key]:.2f}" if e.key in vs_train else ""
        c = f"{vs_cnx[e.key][0]:.2f} ({vs_cnx[e.key][1]})" if e.key in vs_cnx else ""
        lines.append(
            f"| {e.arch} | {e.form} | {e.params_m:.2f} | {e.gmacs:.2f} | {e.throughput(b):.1f} "
            f"| ±{e.throughput_iqr_pct() / 2:.0f}% | {e.latency_ms():.1f} | {t} | {c} |"
        )
    lines += [
        "",
        f"GMACs: FlopCounterMode (convolutions and matrix products only) for one {s}×{s} image. "
        "IQR: half the inter-quartile range of the per-round batch times, relative to the median.",
    ]
    if ratios:
        lines += [
            "",
            "Speed ratios (median over rounds of the per-round ratio; > 1 means faster than the reference):",
            "",
            "| Model | Reference | Throughput × | Latency b1 × |",
            "|---|---|--:|--:|",
        ]
        lines += [f"| {r.model} | {r.ref} | {r.throughput:.2f} | {r.latency:.2f} |" for r in ratios]
    if checks:
        diffs = ", ".join(
            f"{arch} {c['max_abs_diff']:.1e} (max |out| {c['max_abs_output']:.1f})"
            for arch, c in checks.items()
        )
        lines += ["", f"Deploy vs training form, max |Δ| of the logits on one image: {diffs}."]
    return "\n".join(lines)


def _git_revision() -> str:
    """Short commit of the checkout, with ``+dirty`` when ``uniperception/`` has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "uniperception"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument(
        "--models",
        nargs="+",
        help="uniperception or timm model names (space or comma separated); default: UniRepLKNet A/F/P/N "
        "and convnext_atto/femto/pico/nano",
    )
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="UniRepLKNet forms to time")
    p.add_argument("--batch", type=int, default=None, help="batch size for throughput (default 32; quick 8)")
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved timing rounds (default 30; quick 3)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up rounds over all models (default 2; quick 1)"
    )
    p.add_argument(
        "--latency-iters",
        type=int,
        default=None,
        help="batch-1 forwards per model per round (default 5; quick 2)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--img-size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="stop starting new timed rounds after this many seconds (at least 3 rounds are done)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", metavar="OUT", help="also write the results (with raw timings) to this JSON file"
    )
    p.add_argument("--quick", action="store_true", help="fast smoke run (A + atto, batch 8, 3 rounds)")
    args = p.parse_args(argv)

    quick = args.quick
    batch = args.batch or (8 if quick else 32)
    repeats = args.repeats or (3 if quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    latency_iters = args.latency_iters or (2 if quick else 5)
    names = _parse_models(args.models, quick)

    torch.set_num_threads(args.threads)
    malloc_env_set = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    if not malloc_env_set:
        print(
            "note: " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + " is not set; timings may "
            "include page-fault overhead",
            file=sys.stderr,
        )

    entries, checks = build_entries(names, args.forms, args.img_size, args.seed)
    repeats = run_benchmark(
        entries, batch, args.img_size, repeats, warmup, latency_iters, args.seed, args.time_budget
    )
    ratios = compute_ratios(entries)

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover
        timm_version = "n/a"
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "timm": timm_version,
        "uniperception": up.__version__,
        "git": _git_revision(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "img_size": args.img_size,
        "repeats": repeats,
        "warmup": warmup,
        "latency_iters": latency_iters,
        "cpu_share": cpu_share(entries, torch.get_num_threads()),
        "malloc_env_set": malloc_env_set,
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(markdown(entries, ratios, checks, meta))
    if args.json:
        result = {
            "meta": meta,
            "models": [
                {
                    "key": e.key,
                    "arch": e.arch,
                    "form": e.form,
                    "params_m": e.params_m,
                    "gmacs": e.gmacs,
                    "throughput_img_s": e.throughput(batch),
                    "throughput_iqr_pct": e.throughput_iqr_pct(),
                    "latency_ms": e.latency_ms(),
                    "throughput_best_img_s": batch / min(e.batch_s),
                    "batch_times_s": e.batch_s,
                    "batch_cpu_times_s": e.batch_cpu_s,
                    "latency_times_s": e.latency_s,
                }
                for e in entries
            ],
            "ratios": [r.__dict__ for r in ratios],
            "reparam_check": checks,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
