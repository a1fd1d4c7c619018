"""CPU speed of the UniRepLKNet backbones (training, deploy and official forms) next to timm's ConvNeXt V1/V2.

For every UniRepLKNet variant asked for (default A/F/P/N) the script builds the model in training form
(BatchNorms and parallel dilated branches, run in eval mode), a deep copy converted with
``reparameterize()`` (deploy form, same outputs), and an ``official`` form: the deploy form run through a
faithful re-creation of the official code path on the same modules (NCHW activations, plain ``F.conv2d``
depthwise convs without the engine, NHWC ``Linear``s on permuted views, GRN with ``torch.norm``, official
LayerNorm formula; see ``benchmarks/_common.py``), so that deploy vs official shows what the convolution
engine and the block-level work gained. Beside them, timm's ConvNeXt and ConvNeXt-V2 of similar FLOPs
(A↔atto, F↔femto, P↔pico, N↔nano; ``pretrained=False``, eval). In one run it measures, side by side:

* throughput (images/s) of forward passes at every ``--batch`` (default 16 and 32) × 3 × ``--img-size``²;
* batch-1 latency (ms);
* FLOPs, as GMACs = FLOPs / 2 / 1e9 from ``torch.utils.flop_counter.FlopCounterMode`` (which counts only
  convolutions and matrix products, 2 FLOPs per MAC), and the parameter count (millions);
* attained GFLOP/s (2 × GMACs × images/s) as a fraction of this CPU's float32 matrix-multiply peak,
  measured in every round of the same run: the best of three large ``torch.mm`` (2048³) and the best of
  three oneDNN 1×1 ``F.conv2d`` on a channels-last input (32×256×28², 256→1024); the peak used is the
  larger of the two medians (the report gives both);
* speed ratios (> 1 means faster than the reference): deploy vs training form, deploy vs official form, and
  each UniRepLKNet form vs its ConvNeXt and ConvNeXt-V2 pair, at every batch size.

Everything runs under ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)`` (default 2).
The machines are shared and noisy, so the models first go through untimed warm-up rounds and are then
timed round-robin: each repeat (round) times every model once at every batch size and
``--latency-iters`` times at batch 1, and the starting model rotates from round to round. Throughput
and latency are medians over the rounds; a ratio is the median over rounds of the per-round ratio (both
models measured seconds apart). Every round also records the share of the machine's CPU that other
processes used (``/proc/stat``); rounds go on until ``--repeats`` of them were below ``--quiet-threshold``
(default 10%), or ``--max-rounds`` / ``--time-budget`` stop them, and the statistics use only those quiet
rounds when at least three exist; the report gives both counts. ``--wait-quiet`` makes it sleep through
other jobs instead of timing through them. Nothing is asserted about wall times.

Page faults are expensive on the project VMs; run with glibc's malloc told to keep freed memory::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        .venv/bin/python benchmarks/backbone_speed.py --repeats 15 --time-budget 480 --wait-quiet 1800 --json out.json

(the report says whether those variables were set; ``--time-budget`` caps the timed rounds when the
machine is busy, and the report gives the number of rounds actually done). Before timing, BatchNorm statistics, layer scales
and GRN parameters of the UniRepLKNet models are randomised (values do not change the speed) and the
deploy and official forms are checked against the training form on one image. ``--quick`` is a smoke run
(A, atto and V2 atto only unless ``--models`` is given, batch 8, 3 rounds). The markdown table goes to
stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import uniperception as up

try:
    from _common import (
        OtherLoad,
        base_meta,
        cpu_share,
        make_official,
        malloc_env_set,
        quiet_rounds,
        randomize_state,
        rounds_note,
        timed_rounds,
        warn_malloc_env,
        write_json,
    )
except ImportError:  # run as ``python -m benchmarks.backbone_speed``
    from benchmarks._common import (
        OtherLoad,
        base_meta,
        cpu_share,
        make_official,
        malloc_env_set,
        quiet_rounds,
        randomize_state,
        rounds_note,
        timed_rounds,
        warn_malloc_env,
        write_json,
    )

CONVNEXT_PAIR = {
    "unireplknet_a": "convnext_atto",
    "unireplknet_f": "convnext_femto",
    "unireplknet_p": "convnext_pico",
    "unireplknet_n": "convnext_nano",
}
CONVNEXTV2_PAIR = {k: v.replace("convnext_", "convnextv2_") for k, v in CONVNEXT_PAIR.items()}
DEFAULT_MODELS = [*CONVNEXT_PAIR, *CONVNEXT_PAIR.values(), *CONVNEXTV2_PAIR.values()]
QUICK_MODELS = ["unireplknet_a", "convnext_atto", "convnextv2_atto"]
FORMS = ("training", "deploy", "official")
#: contract targets: (model, reference, minimum throughput ratio) at every batch size
TARGETS = [("unireplknet_a (deploy)", "convnextv2_atto", 1.15), ("unireplknet_a (deploy)", "convnext_atto", 0.80)]
PEAK_TARGET = 0.65


@dataclass
class Entry:
    """One benchmarked model (an architecture in one form) and its measurements."""

    arch: str
    form: str  # "training" / "deploy" / "official" for UniRepLKNet, "-" for timm models
    model: nn.Module
    params_m: float = 0.0
    gmacs: float = 0.0
    batch_s: dict[int, list[float]] = field(default_factory=dict)  # batch -> one forward per round
    batch_cpu_s: dict[int, list[float]] = field(default_factory=dict)  # process CPU time of those forwards
    latency_s: list[list[float]] = field(default_factory=list)  # batch-1 forwards, a list per round
    use: list[int] = field(default_factory=list)  # rounds the statistics use (the uncontended ones)

    @property
    def key(self) -> str:
        return self.arch if self.form == "-" else f"{self.arch} ({self.form})"

    def times(self, batch: int) -> list[float]:
        t = self.batch_s[batch]
        return [t[i] for i in self.use] if self.use else t

    def latencies(self) -> list[list[float]]:
        return [self.latency_s[i] for i in self.use] if self.use else self.latency_s

    def throughput(self, batch: int) -> float:
        return batch / statistics.median(self.times(batch))

    def throughput_iqr_pct(self, batch: int) -> float:
        """Inter-quartile range of the per-round batch times, in % of their median (a noise gauge)."""
        t = self.times(batch)
        if len(t) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(t, n=4)
        return 100.0 * (q3 - q1) / statistics.median(t)

    def latency_ms(self) -> float:
        return 1e3 * statistics.median(t for rnd in self.latencies() for t in rnd)

    def gflops(self, batch: int) -> float:
        """Attained GFLOP/s at ``batch`` (2 FLOPs per counted MAC)."""
        return 2.0 * self.gmacs * self.throughput(batch)


@dataclass
class Ratio:
    """Speed of ``model`` relative to ``ref``: > 1 means ``model`` is faster."""

    model: str
    ref: str
    kind: str  # "deploy vs training", "deploy vs official" or "vs ConvNeXt" / "vs ConvNeXt-V2"
    throughput: dict[int, float]  # batch -> ratio
    latency: float


@dataclass
class Peak:
    """Per-round float32 matmul peak measurements (GFLOP/s)."""

    mm: list[float] = field(default_factory=list)
    conv1x1: list[float] = field(default_factory=list)
    use: list[int] = field(default_factory=list)

    def _median(self, v: list[float]) -> float:
        return statistics.median([v[i] for i in self.use] if self.use else v)

    def mm_gflops(self) -> float:
        return self._median(self.mm)

    def conv_gflops(self) -> float:
        return self._median(self.conv1x1)

    def value(self) -> float:
        return max(self.mm_gflops(), self.conv_gflops())

    def source(self) -> str:
        return "torch.mm" if self.mm_gflops() >= self.conv_gflops() else "1×1 conv"


# ------------------------------------------------------------------------------------------------ building
def _parse_models(values: list[str] | None, quick: bool) -> list[str]:
    if not values:
        return list(QUICK_MODELS if quick else DEFAULT_MODELS)
    names: list[str] = []
    for v in values:
        names.extend(n.strip() for n in v.split(",") if n.strip())
    return list(dict.fromkeys(names))


def build_entries(names: list[str], forms: list[str], img_size: int, seed: int) -> tuple[list[Entry], dict]:
    """Build every model; returns the entries and, per UniRepLKNet arch and form, the max |Δ| vs training."""
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
            randomize_state(train, gen)
            deploy = copy.deepcopy(train).reparameterize().eval()
            official = make_official(copy.deepcopy(deploy)).eval()
            with torch.inference_mode():
                ref = train(probe)
                checks[name] = {"max_abs_output": float(ref.abs().max())}
                for form, m in (("deploy", deploy), ("official", official)):
                    checks[name][form] = float((ref - m(probe)).abs().max())
            for form, m in (("training", train), ("deploy", deploy), ("official", official)):
                if form in forms:
                    entries.append(Entry(name, form, m))
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

    UniRepLKNet models are counted on a copy switched to the official code path (plain ``nn.Conv2d``
    depthwise convs, NHWC ``Linear``s), so that the count describes the network and not the engine's
    kernels (FlopCounterMode does not see the fused oneDNN ops of the inference fast path).
    """
    if hasattr(model, "set_conv_impl"):
        model = make_official(copy.deepcopy(model))
    x = torch.randn(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


# ------------------------------------------------------------------------------------------------ peak
class PeakProbe:
    """Large float32 GEMMs whose speed stands for this CPU's attainable peak (GFLOP/s)."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed + 2)
        n = 2048
        self.a = torch.randn(n, n, generator=gen)
        self.b = torch.randn(n, n, generator=gen)
        self.mm_flops = 2.0 * n**3
        self.x = torch.randn(32, 256, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
        self.w = torch.randn(1024, 256, 1, 1, generator=gen)
        self.conv_flops = 2.0 * 32 * 28 * 28 * 256 * 1024

    def measure(self, peak: Peak, tries: int = 3) -> None:
        best_mm = min(_wall(lambda: torch.mm(self.a, self.b)) for _ in range(tries))
        best_conv = min(_wall(lambda: F.conv2d(self.x, self.w)) for _ in range(tries))
        peak.mm.append(self.mm_flops / best_mm / 1e9)
        peak.conv1x1.append(self.conv_flops / best_conv / 1e9)


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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


def run_benchmark(
    entries: list[Entry],
    batches: list[int],
    img_size: int,
    repeats: int,
    warmup: int,
    latency_iters: int,
    seed: int,
    peak: Peak,
    others: list[float],
    time_budget_s: float | None = None,
    quiet_threshold: float = 0.1,
    max_rounds: int | None = None,
    wait_quiet_s: float = 0.0,
) -> int:
    """Warm up, then time interleaved rounds until ``repeats`` of them were quiet; returns the rounds done.

    A round is quiet when other processes used at most ``quiet_threshold`` of the machine's CPU during it
    (appended to ``others``). Rounds stop after ``max_rounds`` (default 3 × ``repeats``) or, with
    ``time_budget_s``, once that many seconds of timed rounds have passed (at least 3 rounds are always
    done). Every round also measures the matmul peak once. After a contended round it sleeps until the
    machine is quiet again, up to ``wait_quiet_s`` seconds in all (not counted in the budget).
    """
    max_rounds = max_rounds or 3 * repeats
    gen = torch.Generator().manual_seed(seed + 1)
    xbs = {b: torch.randn(b, 3, img_size, img_size, generator=gen) for b in batches}
    x1 = torch.randn(1, 3, img_size, img_size, generator=gen)
    probe = PeakProbe(seed)
    for e in entries:
        e.batch_s = {b: [] for b in batches}
        e.batch_cpu_s = {b: [] for b in batches}
    with torch.inference_mode():
        for w in range(warmup):  # untimed rounds, in the same round-robin pattern as the timed ones
            print(f"warm-up round {w + 1}/{warmup}", file=sys.stderr, flush=True)
            probe.measure(Peak(), tries=1)
            for e in entries:
                for b in batches:
                    e.model(xbs[b])
                for _ in range(latency_iters):
                    e.model(x1)
        n = len(entries)

        def one_round(r: int, load: OtherLoad) -> str:
            load.start()
            probe.measure(peak)
            for i in range(n):  # round-robin over all models; the first one rotates per round
                e = entries[(r + i) % n]
                for b in batches:
                    wall, cpu = _timed_cpu(e.model, xbs[b])
                    e.batch_s[b].append(wall)
                    e.batch_cpu_s[b].append(cpu)
                e.latency_s.append([_timed(e.model, x1) for _ in range(latency_iters)])
            load.stop()
            return f"peak mm {peak.mm[-1]:.0f}, 1×1 conv {peak.conv1x1[-1]:.0f} GFLOP/s"

        done = timed_rounds(
            one_round, others, repeats, quiet_threshold=quiet_threshold, max_rounds=max_rounds,
            time_budget_s=time_budget_s, wait_quiet_s=wait_quiet_s,
        )  # fmt: skip
    return done


def _paired_ratio(model: Entry, ref: Entry, kind: str) -> Ratio:
    thr = {
        b: statistics.median(rb / mb for rb, mb in zip(ref.times(b), model.times(b), strict=True))
        for b in model.batch_s
    }
    lat = statistics.median(
        statistics.median(rl) / statistics.median(ml)
        for rl, ml in zip(ref.latencies(), model.latencies(), strict=True)
    )
    return Ratio(model.key, ref.key, kind, thr, lat)


def compute_ratios(entries: list[Entry]) -> list[Ratio]:
    by_key = {e.key: e for e in entries}
    ratios: list[Ratio] = []
    for e in entries:
        if e.form == "deploy" and f"{e.arch} (training)" in by_key:
            ratios.append(_paired_ratio(e, by_key[f"{e.arch} (training)"], "deploy vs training"))
        if e.form == "deploy" and f"{e.arch} (official)" in by_key:
            ratios.append(_paired_ratio(e, by_key[f"{e.arch} (official)"], "deploy vs official"))
    for pairs, kind in ((CONVNEXT_PAIR, "vs ConvNeXt"), (CONVNEXTV2_PAIR, "vs ConvNeXt-V2")):
        for e in entries:
            pair = pairs.get(e.arch)
            if e.form != "-" and pair in by_key:
                ratios.append(_paired_ratio(e, by_key[pair], kind))
    return ratios


# ------------------------------------------------------------------------------------------------ report
def markdown(
    entries: list[Entry],
    ratios: list[Ratio],
    checks: dict[str, dict[str, float]],
    peak: Peak,
    meta: dict[str, Any],
) -> str:
    bs = meta["batches"]
    bmax = max(bs)
    s = meta["img_size"]
    pk = peak.value()
    by = {(r.model, r.kind): r for r in ratios}

    def ratio_cell(key: str, kind: str) -> str:
        r = by.get((key, kind))
        return f"{r.throughput[bmax]:.2f}" if r else ""

    lines = [
        f"uniperception {meta['uniperception']} ({meta['git']}), torch {meta['torch']}, timm {meta['timm']}, "
        f"{meta['threads']} threads, {meta['cpu']}, "
        f"{meta['date']}; malloc env set: {'yes' if meta['malloc_env_set'] else 'NO'}; "
        f"{meta['repeats']} interleaved rounds; {rounds_note(meta)} "
        f"CPU share {100 * meta['cpu_share']:.0f}% "
        "(process CPU time / (wall time × threads) of the timed batch forwards; ~100% = uncontended); "
        f"other processes used {100 * meta['other_load']:.0f}% of the machine's CPU (median over the rounds used). "
        f"float32 peak {pk:.0f} GFLOP/s ({peak.source()}; torch.mm 2048³ {peak.mm_gflops():.0f}, "
        f"oneDNN 1×1 conv channels-last {peak.conv_gflops():.0f}; medians over rounds of the "
        "best of three).",
        "",
        "| Model | Form | Params (M) | GMACs | "
        + " | ".join(f"img/s b{b}" for b in bs)
        + f" | IQR b{bmax} | Latency b1 (ms) | GFLOP/s b{bmax} | % of peak | × official | × training "
        "| × ConvNeXt | × ConvNeXt-V2 |",
        "|---|---|--:|--:|" + "--:|" * len(bs) + "--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for e in entries:
        lines.append(
            f"| {e.arch} | {e.form} | {e.params_m:.2f} | {e.gmacs:.2f} | "
            + " | ".join(f"{e.throughput(b):.1f}" for b in bs)
            + f" | ±{e.throughput_iqr_pct(bmax) / 2:.0f}% | {e.latency_ms():.1f} | {e.gflops(bmax):.0f} "
            f"| {100 * e.gflops(bmax) / pk:.0f}% | {ratio_cell(e.key, 'deploy vs official')} "
            f"| {ratio_cell(e.key, 'deploy vs training')} | {ratio_cell(e.key, 'vs ConvNeXt')} "
            f"| {ratio_cell(e.key, 'vs ConvNeXt-V2')} |"
        )
    lines += [
        "",
        f"GMACs: FlopCounterMode (convolutions and matrix products only) for one {s}×{s} image. "
        f"IQR: half the inter-quartile range of the per-round batch-{bmax} times, relative to the median. "
        f"Ratio columns: throughput at batch {bmax}, median of per-round ratios (> 1 = faster).",
    ]
    if ratios:
        lines += [
            "",
            "Speed ratios (median over rounds of the per-round ratio; > 1 means faster than the reference):",
            "",
            "| Model | Reference | " + " | ".join(f"Throughput b{b} ×" for b in bs) + " | Latency b1 × |",
            "|---|---|" + "--:|" * len(bs) + "--:|",
        ]
        lines += [
            f"| {r.model} | {r.ref} | " + " | ".join(f"{r.throughput[b]:.2f}" for b in bs) + f" | {r.latency:.2f} |"
            for r in ratios
        ]
    targets = [(m, ref, t, by.get((m, k))) for m, ref, t in TARGETS for k in ("vs ConvNeXt", "vs ConvNeXt-V2")]
    targets = [(m, ref, t, r) for m, ref, t, r in targets if r is not None and r.ref == ref]
    if targets:
        lines += ["", "Contract targets (throughput ratio):", "", "| Model | Reference | Target | "
                  + " | ".join(f"b{b}" for b in bs) + " | Met |", "|---|---|--:|" + "--:|" * len(bs) + "---|"]
        for m, ref, t, r in targets:
            ok = all(r.throughput[b] >= t for b in bs)
            lines.append(f"| {m} | {ref} | ≥{t:.2f} | " + " | ".join(f"{r.throughput[b]:.2f}" for b in bs)
                         + f" | {'yes' if ok else 'no'} |")
    if checks:
        diffs = ", ".join(
            f"{arch} deploy {c['deploy']:.1e}, official {c['official']:.1e} (max |out| {c['max_abs_output']:.1f})"
            for arch, c in checks.items()
        )
        lines += ["", f"Deploy and official forms vs training form, max |Δ| of the logits on one image: {diffs}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument(
        "--models",
        nargs="+",
        help="uniperception or timm model names (space or comma separated); default: UniRepLKNet A/F/P/N, "
        "convnext_atto/femto/pico/nano and convnextv2_atto/femto/pico/nano",
    )
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="UniRepLKNet forms to time")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes for throughput (default 16 32; quick 8)")
    p.add_argument(
        "--repeats", type=int, default=None, help="uncontended timing rounds wanted (default 20; quick 3)"
    )
    p.add_argument("--max-rounds", type=int, default=None, help="cap on timed rounds (default 3 × --repeats)")
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
    p.add_argument("--quiet-threshold", type=float, default=0.1, metavar="FRACTION",
                   help="statistics use only rounds during which other processes used at most this fraction "
                   "of the machine's CPU, if at least 3 such rounds exist (default 0.1)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="after a contended round, sleep until the machine is quiet again, up to this many "
                   "seconds in all (not counted in --time-budget; default 0 = never wait)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", metavar="OUT", help="also write the results (with raw timings) to this JSON file"
    )
    p.add_argument("--quick", action="store_true", help="fast smoke run (A + atto + V2 atto, batch 8, 3 rounds)")
    args = p.parse_args(argv)

    quick = args.quick
    batches = sorted(set(args.batch or ([8] if quick else [16, 32])))
    repeats = args.repeats or (3 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    latency_iters = args.latency_iters or (2 if quick else 5)
    names = _parse_models(args.models, quick)

    torch.set_num_threads(args.threads)
    warn_malloc_env()

    entries, checks = build_entries(names, args.forms, args.img_size, args.seed)
    peak = Peak()
    others: list[float] = []
    repeats = run_benchmark(
        entries, batches, args.img_size, repeats, warmup, latency_iters, args.seed, peak, others, args.time_budget,
        args.quiet_threshold, args.max_rounds, args.wait_quiet,
    )
    use = quiet_rounds(others, args.quiet_threshold)
    peak.use = use
    for e in entries:
        e.use = use
    ratios = compute_ratios(entries)

    threads = torch.get_num_threads()
    meta = base_meta(threads) | {
        "batches": batches,
        "img_size": args.img_size,
        "repeats": repeats,
        "warmup": warmup,
        "latency_iters": latency_iters,
        "cpu_share": cpu_share(
            [e.batch_s[b][i] for e in entries for b in batches for i in use],
            [e.batch_cpu_s[b][i] for e in entries for b in batches for i in use],
            threads,
        ),
        "other_load": statistics.median(others[i] for i in use),
        "other_load_per_round": others,
        "rounds_used": len(use),
        "contended": sum(not f > args.quiet_threshold for f in others) < 3,
        "quiet_threshold": args.quiet_threshold,
        "malloc_env_set": malloc_env_set(),
        "peak_gflops": peak.value(),
        "peak_source": peak.source(),
        "peak_mm_gflops": peak.mm_gflops(),
        "peak_conv1x1_gflops": peak.conv_gflops(),
    }
    print(markdown(entries, ratios, checks, peak, meta))
    if args.json:
        result = {
            "meta": meta,
            "peak_rounds": {"mm_gflops": peak.mm, "conv1x1_gflops": peak.conv1x1},
            "models": [
                {
                    "key": e.key,
                    "arch": e.arch,
                    "form": e.form,
                    "params_m": e.params_m,
                    "gmacs": e.gmacs,
                    "throughput_img_s": {b: e.throughput(b) for b in batches},
                    "throughput_iqr_pct": {b: e.throughput_iqr_pct(b) for b in batches},
                    "gflops": {b: e.gflops(b) for b in batches},
                    "fraction_of_peak": {b: e.gflops(b) / peak.value() for b in batches},
                    "latency_ms": e.latency_ms(),
                    "batch_times_s": e.batch_s,
                    "batch_cpu_times_s": e.batch_cpu_s,
                    "latency_times_s": e.latency_s,
                }
                for e in entries
            ],
            "ratios": [r.__dict__ for r in ratios],
            "equivalence_check": checks,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
