"""CPU cost of large kernels: RepLKNet-31B and SLaK-T beside UniRepLKNet-A/T, with the conv engine on and off.

Every model is timed in its training form (BatchNorms and parallel branches, run in eval mode) and in each
exact inference form, the inference forms once with the large-kernel engine on (``auto``: kernel cropping plus
the dispatch of :mod:`uniperception.ops.depthwise`) and once with it off (``--engine-off``, default ``native``:
``set_conv_impl("native")``, PyTorch's own ``F.conv2d`` on the cropped kernel; ``plain``: every depthwise conv a
plain ``nn.Conv2d.forward``, no cropping and no dispatch, as the official code runs):

* ``unireplknet_a`` / ``unireplknet_t``: training; deploy (``reparameterize()``) × {auto, off};
* ``replknet_31b``: training; deploy (merged 31/29/27/13 kernels) × {auto, off};
* ``slak_t``: training; ``rect`` (``reparameterize("rect")``: the M×5, 5×M and 5×5 branches kept, each BN
  folded in) × {auto, off}; ``dense`` (``reparameterize("dense")``: one merged 51/49/47/13 kernel per block)
  × {auto, off}.

Per model and form it reports images/s and ms per batch of ``--batch`` × 3 × ``--img-size``² (default 8 ×
224²), the parameter count, GMACs (``FlopCounterMode`` FLOPs / 2 for one image, counted on the official code
path of ``benchmarks/_common.py`` so the count describes the network, not the engine's kernels) and the part
of them in depthwise convolutions, and speed ratios (> 1 = faster than the reference; medians of per-round
ratios): each form vs its own training form, engine auto vs off for the same form, and every entry vs
``unireplknet_a`` deploy/auto. Before timing, BatchNorm statistics and layer scales are randomised (they do
not change the speed) and every inference form is checked against its training form on the timed input
batch: max |Δ logits| ≤ 1e-4 × max |logits| (the table's ≡ column); a failing check makes the exit status 1.

Everything runs under ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)`` (default 2).
Timing follows ``benchmarks/backbone_speed.py``: an untimed check pass and ``--warmup`` rounds, then rounds
that time every entry once, round-robin with the first entry rotating per round; rounds go on until
``--repeats`` of them were quiet (other processes ≤ ``--quiet-threshold`` of the machine's CPU, from
``/proc/stat``), or ``--max-rounds`` / ``--time-budget`` stop them; statistics use the quiet rounds when at
least three exist. ``--wait-quiet`` sleeps through other jobs instead of timing through them. The
engine-on and engine-off entries of one form share the same module (the engine is switched between timed
calls, outside the timed region). ``UNIPERCEPTION_CONV_IMPL`` is ignored (removed from this process's
environment) so that ``auto`` means the automatic choice. Nothing is asserted about wall times.

Run with glibc's malloc told to keep freed memory (see ``docs/benchmarks.md``)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        .venv/bin/python benchmarks/large_kernel_speed.py --repeats 10 --time-budget 900 --wait-quiet 1800 \\
        --json /tmp/bench/large_kernel_speed.json

``--quick`` is a smoke run (64², batch 2, 2 rounds, no extra warm-up). The markdown table and the command
line go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import uniperception as up
from uniperception.ops import DepthwiseConv2d
from uniperception.ops.depthwise import ENV_VAR

try:
    from _common import (
        MALLOC_ENV,
        OtherLoad,
        base_meta,
        cpu_share,
        header_line,
        make_official,
        quiet_rounds,
        randomize_state,
        rounds_note,
        timed_rounds,
        warn_malloc_env,
        write_json,
    )
except ImportError:  # run as ``python -m benchmarks.large_kernel_speed``
    from benchmarks._common import (
        MALLOC_ENV,
        OtherLoad,
        base_meta,
        cpu_share,
        header_line,
        make_official,
        quiet_rounds,
        randomize_state,
        rounds_note,
        timed_rounds,
        warn_malloc_env,
        write_json,
    )

DEFAULT_MODELS = ["unireplknet_a", "unireplknet_t", "replknet_31b", "slak_t"]
REFERENCE = ("unireplknet_a", "deploy", "auto")
ENGINES_OFF = ("native", "plain")
REL_TOL = 1e-4


@dataclass
class Entry:
    """One timed configuration: a model in one form, run with one engine setting."""

    arch: str
    form: str  # "training", "deploy" (UniRepLKNet, RepLKNet), "rect" / "dense" (SLaK)
    engine: str  # "auto", "native" or "plain"
    model: nn.Module
    kernels: str = ""
    params_m: float = 0.0
    gmacs: float = 0.0
    dw_gmacs: float = 0.0
    rel_err: float | None = None  # max |Δ logits| / max |training logits|; None for the training form
    times_s: list[float] = field(default_factory=list)  # one batch forward per round
    cpu_s: list[float] = field(default_factory=list)
    use: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.arch} ({self.form}, {self.engine})"

    def times(self) -> list[float]:
        return [self.times_s[i] for i in self.use] if self.use else self.times_s

    def ms_per_batch(self) -> float:
        return 1e3 * statistics.median(self.times())

    def throughput(self, batch: int) -> float:
        return batch / statistics.median(self.times())

    def iqr_pct(self) -> float:
        """Half the inter-quartile range of the per-round times, in % of their median."""
        t = self.times()
        if len(t) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(t, n=4)
        return 50.0 * (q3 - q1) / statistics.median(t)

    def check_ok(self) -> bool:
        return self.rel_err is None or self.rel_err <= REL_TOL


# ------------------------------------------------------------------------------------------------ building
def _parse_models(values: list[str] | None) -> list[str]:
    if not values:
        return list(DEFAULT_MODELS)
    names: list[str] = []
    for v in values:
        names.extend(n.strip() for n in v.split(",") if n.strip())
    known = set(up.list_models())
    for n in names:
        if n not in known:
            raise SystemExit(f"unknown model {n!r}; choose from uniperception's list_models()")
    return list(dict.fromkeys(names))


def set_engine(model: nn.Module, engine: str) -> None:
    """``auto`` / ``native``: ``set_conv_impl`` on every engine conv; ``plain``: ``nn.Conv2d.forward`` as called."""
    for m in model.modules():
        if isinstance(m, DepthwiseConv2d):
            if engine == "plain":
                m.forward = types.MethodType(nn.Conv2d.forward, m)
            else:
                m.__dict__.pop("forward", None)
                m.impl = engine
                m.locked_impl = None


def kernels_of(model: nn.Module, form: str) -> str:
    """The large kernels per stage, e.g. ``31/29/27/13`` or ``51×5/49×5/47×5/13×5``."""
    if hasattr(model, "large_kernel_sizes"):  # RepLKNet
        ks = "/".join(str(k) for k in model.large_kernel_sizes)
        return ks + (" + 5×5" if form == "training" else "")
    if hasattr(model, "kernel_size") and hasattr(model, "reparam_form"):  # SLaK
        *longs, short = model.kernel_size
        if form == "dense":
            return "/".join(f"{max(k, short)}²" for k in longs)
        return "/".join(f"{k}×{short}" for k in longs) + f" + {short}×{short}"
    if hasattr(model, "kernel_sizes"):  # UniRepLKNet
        ks = "/".join(str(max(s)) for s in model.kernel_sizes)
        return ks + (" + dilated" if form == "training" else "")
    return "?"


def count_macs(model: nn.Module, img_size: int) -> tuple[float, float]:
    """(GMACs, depthwise-conv GMACs) of one 3×``img_size``² image, on the official code path.

    Every depthwise conv runs as a plain ``nn.Conv2d.forward`` (full kernels, no cropping). UniRepLKNet is
    counted on a copy switched to the official path by ``make_official`` (its deploy blocks use fused
    inference ops that FlopCounterMode would not see); the other models have no such ops, so their own
    modules are counted with the engine set to ``plain`` and then back to ``auto`` (no copy of big models).
    """
    from uniperception.layers.unireplknet_block import UniRepLKNetBlock

    fused = any(isinstance(m, UniRepLKNetBlock) for m in model.modules())
    plain = make_official(copy.deepcopy(model)).eval() if fused else model
    if not fused:
        set_engine(plain, "plain")
    dw = [0]

    def hook(m: nn.Module, _inp: Any, out: Tensor) -> None:
        kh, kw = m.kernel_size  # type: ignore[misc]
        dw[0] += out.numel() * kh * kw

    handles = [
        m.register_forward_hook(hook)
        for m in plain.modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
    ]
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            plain(torch.randn(1, 3, img_size, img_size))
    finally:
        for h in handles:
            h.remove()
        if not fused:
            set_engine(plain, "auto")
    return counter.get_total_flops() / 2 / 1e9, dw[0] / 1e9


def build_entries(names: list[str], engine_off: str, img_size: int, seed: int) -> list[Entry]:
    entries: list[Entry] = []
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        print(f"building {name}", file=sys.stderr, flush=True)
        torch.manual_seed(seed)
        train = up.create_model(name).eval()
        if not hasattr(train, "reparameterize"):
            raise SystemExit(f"{name} has no inference form (reparameterize)")
        randomize_state(train, gen)
        forms: list[tuple[str, nn.Module]] = [("training", train)]
        if hasattr(train, "reparam_form"):  # SLaK: two inference forms
            forms += [(f, copy.deepcopy(train).reparameterize(f).eval()) for f in ("rect", "dense")]
        else:
            forms.append(("deploy", copy.deepcopy(train).reparameterize().eval()))
        for form, m in forms:
            gmacs, dw_gmacs = count_macs(m, img_size)
            params = sum(p.numel() for p in m.parameters()) / 1e6
            for engine in ("auto",) if form == "training" else ("auto", engine_off):
                entries.append(Entry(name, form, engine, m, kernels_of(m, form), params, gmacs, dw_gmacs))
    return entries


def check_equivalence(entries: list[Entry], x: Tensor) -> None:
    """Run every entry once on ``x`` (also a warm-up) and store its error relative to its training form."""
    ref: dict[str, Tensor] = {}
    with torch.inference_mode():
        for e in entries:
            set_engine(e.model, e.engine)
            y = e.model(x)
            if e.form == "training":
                ref[e.arch] = y
                continue
            r = ref[e.arch]
            e.rel_err = float((y - r).abs().max() / r.abs().max())
            status = "ok" if e.check_ok() else f"FAILED (> {REL_TOL:g})"
            print(f"check {e.key}: max |Δ| / max |logits| = {e.rel_err:.1e} {status}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ timing
def run_benchmark(
    entries: list[Entry],
    x: Tensor,
    repeats: int,
    warmup: int,
    others: list[float],
    time_budget_s: float | None,
    quiet_threshold: float,
    max_rounds: int,
    wait_quiet_s: float,
) -> int:
    """Warm up, then time interleaved rounds until ``repeats`` of them were quiet; returns the rounds done."""
    min_rounds = min(3, repeats)
    with torch.inference_mode():
        for w in range(warmup):
            print(f"warm-up round {w + 1}/{warmup}", file=sys.stderr, flush=True)
            for e in entries:
                set_engine(e.model, e.engine)
                e.model(x)
        n = len(entries)

        def one_round(r: int, load: OtherLoad) -> str:
            for i in range(n):  # round-robin; the first entry rotates per round
                e = entries[(r + i) % n]
                set_engine(e.model, e.engine)  # outside the timed region and the load gauge
                load.start()
                c0, t0 = time.process_time(), time.perf_counter()
                e.model(x)
                e.times_s.append(time.perf_counter() - t0)
                e.cpu_s.append(time.process_time() - c0)
                load.stop()
            return ""

        done = timed_rounds(
            one_round, others, repeats, quiet_threshold=quiet_threshold, max_rounds=max_rounds,
            time_budget_s=time_budget_s, wait_quiet_s=wait_quiet_s, min_rounds=min_rounds,
        )  # fmt: skip
    return done


def paired_ratio(e: Entry, ref: Entry) -> float:
    """Median over the rounds used of ref time / e time (> 1: ``e`` is faster)."""
    return statistics.median(r / t for r, t in zip(ref.times(), e.times(), strict=True))


def compute_ratios(entries: list[Entry], engine_off: str) -> dict[str, dict[str, float]]:
    by = {(e.arch, e.form, e.engine): e for e in entries}
    ref = by.get(REFERENCE)
    out: dict[str, dict[str, float]] = {}
    for e in entries:
        r: dict[str, float] = {}
        train = by.get((e.arch, "training", "auto"))
        if e.form != "training" and train is not None:
            r["vs_training"] = paired_ratio(e, train)
        off = by.get((e.arch, e.form, engine_off))
        if e.engine == "auto" and off is not None:
            r["auto_vs_off"] = paired_ratio(e, off)
        if ref is not None:
            r["vs_reference"] = paired_ratio(e, ref)
        out[e.key] = r
    return out


# ------------------------------------------------------------------------------------------------ report
def command_line(argv: list[str]) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ)
    exe = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    script = os.path.relpath(os.path.abspath(__file__))
    return " ".join(p for p in (env, exe, script, shlex.join(argv)) if p)


def markdown(entries: list[Entry], ratios: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    b, s, off = meta["batch"], meta["img_size"], meta["engine_off"]

    def cell(e: Entry, k: str) -> str:
        v = ratios[e.key].get(k)
        return "" if v is None else f"{v:.2f}"

    def check(e: Entry) -> str:
        if e.rel_err is None:
            return "ref"
        return f"{'✓' if e.check_ok() else '✗ FAIL'} {e.rel_err:.0e}"

    lines = [
        header_line(meta) + " " + f"{meta['rounds_done']} interleaved rounds; {rounds_note(meta)} "
        f"batch {b} × 3 × {s}²; engine off = {off}.",
        "",
        "| Model | Form | Large kernels (stage 1–4) | Engine | Params (M) | GMACs | of which dw | "
        f"img/s b{b} | ms/batch | IQR | × training | × {off} | × UniRepLKNet-A | ≡ training |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e.arch} | {e.form} | {e.kernels} | {e.engine} | {e.params_m:.2f} | {e.gmacs:.2f} | "
            f"{e.dw_gmacs:.3f} | {e.throughput(b):.1f} | {e.ms_per_batch():.1f} | ±{e.iqr_pct():.0f}% | "
            f"{cell(e, 'vs_training')} | {cell(e, 'auto_vs_off')} | {cell(e, 'vs_reference')} | {check(e)} |"
        )
    off_text = (
        "`native` = `set_conv_impl(\"native\")`: PyTorch's `F.conv2d` on the kernel cropped to the taps that reach "
        "the image (the crop is part of the engine's entry point and stays on)"
        if off == "native"
        else "`plain` = every depthwise conv a plain `nn.Conv2d.forward` (full kernel, no cropping, no dispatch)"
    )
    lines += [
        "",
        f"GMACs: FlopCounterMode (convolutions and matrix products only) for one {s}×{s} image, on the official "
        "code path (full kernels); *of which dw*: the depthwise convolutions among them. Engine `auto`: kernel "
        f"cropping + the engine's automatic choice per conv; {off_text}. The training form runs with the engine "
        "on. IQR: half the inter-quartile range of the per-round batch times, relative to their median. Ratio "
        f"columns (throughput, median of per-round ratios, > 1 = faster): vs the same model's training form, "
        f"engine auto vs {off} for the same form, and vs unireplknet_a deploy/auto. ≡ training: max |Δ logits| "
        f"/ max |training logits| on the timed batch (✓ ≤ {REL_TOL:g}).",
        "",
        f"Command: `{meta['command']}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--models", nargs="+", help=f"space or comma separated (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--img-size", type=int, default=None, help="input height and width (default 224; quick 64)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="quiet timing rounds wanted (default 10; quick 2)")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="cap on timed rounds (default 3 × --repeats; quick: --repeats)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up rounds after the equivalence check pass (default 1; quick 0)")
    p.add_argument("--engine-off", choices=ENGINES_OFF, default="native",
                   help="what 'engine off' means: native (set_conv_impl('native'), default) or plain "
                   "(nn.Conv2d.forward, no kernel cropping)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop starting new timed rounds after this many seconds (at least 3 rounds are done)")
    p.add_argument("--quiet-threshold", type=float, default=0.1, metavar="FRACTION",
                   help="statistics use only rounds during which other processes used at most this fraction "
                   "of the machine's CPU, if at least 3 such rounds exist (default 0.1)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="after a contended round, sleep until the machine is quiet again, up to this many "
                   "seconds in all (not counted in --time-budget; default 0 = never wait)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results (with raw timings) to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke run (64², batch 2, 2 rounds, no extra warm-up)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)

    quick = args.quick
    img_size = args.img_size or (64 if quick else 224)
    batch = args.batch or (2 if quick else 8)
    repeats = args.repeats or (2 if quick else 10)
    max_rounds = args.max_rounds or (repeats if quick else 3 * repeats)
    warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    names = _parse_models(args.models)

    forced = os.environ.pop(ENV_VAR, None)
    if forced:
        print(f"note: {ENV_VAR}={forced} ignored (removed from this process's environment)", file=sys.stderr)
    torch.set_num_threads(args.threads)
    warn_malloc_env()

    entries = build_entries(names, args.engine_off, img_size, args.seed)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(args.seed + 1))
    check_equivalence(entries, x)
    others: list[float] = []
    done = run_benchmark(entries, x, repeats, warmup, others, args.time_budget, args.quiet_threshold,
                         max_rounds, args.wait_quiet)
    use = quiet_rounds(others, args.quiet_threshold, min_rounds=min(3, repeats))
    for e in entries:
        e.use = use
    ratios = compute_ratios(entries, args.engine_off)

    threads = torch.get_num_threads()
    meta = base_meta(threads) | {
        "command": command_line(argv),
        "batch": batch,
        "img_size": img_size,
        "engine_off": args.engine_off,
        "repeats": repeats,
        "rounds_done": done,
        "warmup": warmup,
        "cpu_share": cpu_share(
            [e.times_s[i] for e in entries for i in use], [e.cpu_s[i] for e in entries for i in use], threads
        ),
        "other_load": statistics.median(others[i] for i in use),
        "other_load_per_round": others,
        "rounds_used": len(use),
        "contended": sum(not f > args.quiet_threshold for f in others) < min(3, repeats),
        "quiet_threshold": args.quiet_threshold,
        "ignored_conv_impl_env": forced,
    }
    print(markdown(entries, ratios, meta))
    failed = [e.key for e in entries if not e.check_ok()]
    if failed:
        print(f"equivalence check FAILED for: {', '.join(failed)}", file=sys.stderr)
    if args.json:
        result = {
            "meta": meta,
            "models": [
                {
                    "key": e.key, "arch": e.arch, "form": e.form, "engine": e.engine, "kernels": e.kernels,
                    "params_m": e.params_m, "gmacs": e.gmacs, "dw_gmacs": e.dw_gmacs,
                    "throughput_img_s": e.throughput(batch), "ms_per_batch": e.ms_per_batch(),
                    "iqr_pct": e.iqr_pct(), "rel_err_vs_training": e.rel_err, "ratios": ratios[e.key],
                    "batch_times_s": e.times_s, "batch_cpu_times_s": e.cpu_s,
                }
                for e in entries
            ],
        }
        write_json(args.json, result)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
