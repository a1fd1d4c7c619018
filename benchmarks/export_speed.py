"""Eager PyTorch vs onnxruntime (float32 and dynamic int8) vs ``torch.compile`` on CPU, plus test-split accuracy.

    python benchmarks/export_speed.py                                  # unireplknet-a-keywords if shipped
    python benchmarks/export_speed.py runs/keywords/bundle --repeats 10 --json out.json
    python benchmarks/export_speed.py --quick                          # smoke run (3 rounds, no compile)

For one model (a bundle name or directory given on the command line; by default the shipped
``unireplknet-a-keywords`` bundle, else a randomly initialised ``Perceiver("image", backbone="unireplknet_a")``
with 10 labels at 224×224 and randomised BatchNorm/GRN/layer-scale values) it builds, side by side:

* ``eager training``: the Perceiver as loaded (BatchNorms and parallel dilated branches), in eval mode (left
  out for bundles saved in deploy form, which have no training form any more);
* ``eager deploy``: a re-parameterised copy (``reparameterize()``), the form every export starts from;
* ``onnxruntime float32``: the deploy form exported with :func:`uniperception.export.export`;
* ``onnxruntime int8``: the same export with ``quantize="int8"`` (dynamic quantisation of the MatMul/Gemm
  weights, see ``uniperception/export.py``);
* ``torch.compile deploy``: ``torch.compile`` of the deploy form (inductor, one graph per batch size); if
  compiling fails on this machine the report says why and the row is left out.

Speed: every runtime is timed once per round at every ``--batch`` (default 1 and 16) on random inputs of the
processed-input shape, round-robin with the starting runtime rotating per round; throughput is the median
over rounds and a ratio is the median over rounds of the per-round time ratio (both runtimes measured
seconds apart). Rounds during which other processes used more than ``--quiet-threshold`` of the machine's
CPU are left out of the statistics when at least three quiet rounds exist (``benchmarks/_common.py``); the
header says how many were used. torch and onnxruntime both get ``--threads`` threads (default 2);
onnxruntime's idle-thread spinning is off (``--ort-spinning`` turns it on) so that it does not steal CPU
from the runtime timed next. Nothing is asserted about wall times.

Accuracy: when the bundle's card records its training data (``config.json`` → ``card.data``), the test split
of that recipe (``uniperception.training.build_dataset(data, "test")``) goes through the bundle's processor
(``AdapterCollate``, evaluation mode, first piece of each sample, as in training-time evaluation) and top-1
accuracy is computed for eager float32 (training and deploy forms) and both ONNX files, with the int8 model's
top-1 agreement with eager float32 and the largest logit difference. File sizes: ``model.safetensors`` of the
bundle and the two ONNX files. :func:`onnx_test_accuracy` does the ONNX part for any exported file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    from _common import (
        OtherLoad,
        base_meta,
        cpu_share,
        quiet_rounds,
        randomize_state,
        rounds_note,
        timed_rounds,
        warn_malloc_env,
    )
    from backbone_speed import Entry
except ImportError:  # run as ``python -m benchmarks.export_speed``
    from benchmarks._common import (
        OtherLoad,
        base_meta,
        cpu_share,
        quiet_rounds,
        randomize_state,
        rounds_note,
        timed_rounds,
        warn_malloc_env,
    )
    from benchmarks.backbone_speed import Entry

from uniperception import Perceiver, list_bundles
from uniperception.export import export
from uniperception.layers.reparam import reparameterize

DEFAULT_BUNDLE = "unireplknet-a-keywords"
REFERENCE = "eager deploy"
Runner = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------ models
def bundle_dir(name_or_path: str) -> Path | None:
    """The directory of a bundle given by name or path (None when it is neither)."""
    from uniperception.perceiver import BUNDLE_DIR

    for d in (Path(name_or_path), BUNDLE_DIR / name_or_path):
        if (d / "config.json").is_file():
            return d
    return None


def recipe_data(directory: Path) -> dict[str, Any] | None:
    """The ``[data]`` table of the recipe a bundle was trained with (``card.data`` in config.json), if any."""
    card = json.loads((directory / "config.json").read_text()).get("card") or {}
    data = card.get("data")
    data = json.loads(data) if isinstance(data, str) else data
    return data if isinstance(data, dict) and data.get("dataset") else None


def load_model(name: str | None, img_size: int, seed: int) -> tuple[Perceiver, str, Path | None]:
    """The Perceiver to benchmark, a label for the report and its bundle directory (None when random)."""
    name = name or (DEFAULT_BUNDLE if DEFAULT_BUNDLE in list_bundles() else None)
    if name is not None:
        return Perceiver.from_pretrained(name).eval(), name, bundle_dir(name)
    torch.manual_seed(seed)
    p = Perceiver("image", backbone="unireplknet_a", labels=[f"class{i}" for i in range(10)],
                  adapter={"size": img_size}).eval()
    randomize_state(p, torch.Generator().manual_seed(seed))  # non-trivial numbers for the int8 comparison
    return p, f"random unireplknet_a image Perceiver, 10 labels, {img_size}×{img_size}", None


def ort_runner(path: Path, threads: int, spinning: bool = False) -> Runner:
    """A ``Tensor -> Tensor`` callable running an exported ONNX file with onnxruntime on CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def compile_runner(model: torch.nn.Module, shape: tuple[int, ...], batches: list[int]) -> tuple[Runner | None, str]:
    """``torch.compile`` of ``model``, compiled (one graph per batch size) and checked; or None and why not."""
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            for b in batches:
                x = torch.randn(b, *shape)
                d = (compiled(x) - model(x)).abs().max().item()
    except Exception as e:  # any failure is reported, not raised
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return None, f"torch.compile failed: {type(e).__name__}: {msg}"
    return compiled, f"torch.compile (inductor, dynamic=False) compiled in {time.perf_counter() - t0:.0f} s; " \
                     f"max |Δ| vs eager deploy {d:.1e}"


# ------------------------------------------------------------------------------------------------ accuracy
def split_batches(p: Perceiver, data: dict[str, Any], limit: int | None = None,
                 batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
    """The recipe's test split through ``p``'s processor (evaluation mode), as (inputs, labels) batches."""
    from torch.utils.data import DataLoader, Subset

    from uniperception.training import AdapterCollate, build_dataset

    ds = build_dataset(data, "test")
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(limit))
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=AdapterCollate(p.adapter))
    return list(loader)


def evaluate_runners(runners: dict[str, Runner], batches: list[tuple[Tensor, Tensor]],
                     reference: str | None = None) -> dict[str, dict[str, float]]:
    """Top-1 accuracy of every runner on the batches; with ``reference``, also each runner's top-1
    agreement with it and the largest absolute logit difference."""
    logits: dict[str, Tensor] = {}
    with torch.inference_mode():
        for name, run in runners.items():
            logits[name] = torch.cat([run(x) for x, _ in batches])
    y = torch.cat([t for _, t in batches])
    out = {}
    for name, lg in logits.items():
        out[name] = {"top1": float((lg.argmax(-1) == y).float().mean()), "n": len(y)}
        if reference is not None:
            ref = logits[reference]
            out[name]["agreement"] = float((lg.argmax(-1) == ref.argmax(-1)).float().mean())
            out[name]["max_abs_logit_diff"] = float((lg - ref).abs().max())
    return out


def onnx_test_accuracy(onnx_path: str | os.PathLike[str], bundle: str, limit: int | None = None) -> float:
    """Top-1 accuracy of an exported ONNX file on the test split of the recipe recorded in ``bundle``."""
    d = bundle_dir(bundle)
    data = recipe_data(d) if d is not None else None
    if data is None:
        raise SystemExit(f"{bundle}: not a bundle with a recorded recipe (config.json card.data)")
    p = Perceiver.from_pretrained(bundle).eval()
    batches = split_batches(p, data, limit)
    return evaluate_runners({"onnx": ort_runner(Path(onnx_path), torch.get_num_threads())}, batches)["onnx"]["top1"]


# ------------------------------------------------------------------------------------------------ timing
def _timed_cpu(run: Runner, x: Tensor) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    run(x)
    return time.perf_counter() - t0, time.process_time() - c0


def run_rounds(entries: list[Entry], shape: tuple[int, ...], batches: list[int], repeats: int, warmup: int,
               max_rounds: int, quiet_threshold: float, time_budget_s: float | None, wait_quiet_s: float,
               seed: int) -> list[float]:
    """Round-robin timing (see the module docstring); returns the other-process CPU share of every round."""
    gen = torch.Generator().manual_seed(seed + 1)
    xs = {b: torch.randn(b, *shape, generator=gen) for b in batches}
    others: list[float] = []
    for e in entries:
        e.batch_s = {b: [] for b in batches}
        e.batch_cpu_s = {b: [] for b in batches}
    with torch.inference_mode():
        for w in range(warmup):
            print(f"warm-up round {w + 1}/{warmup}", file=sys.stderr, flush=True)
            for e in entries:
                for b in batches:
                    e.model(xs[b])
        n = len(entries)

        def one_round(r: int, load: OtherLoad) -> str:
            load.start()
            for i in range(n):
                e = entries[(r + i) % n]
                for b in batches:
                    wall, cpu = _timed_cpu(e.model, xs[b])
                    e.batch_s[b].append(wall)
                    e.batch_cpu_s[b].append(cpu)
            load.stop()
            return ""

        timed_rounds(
            one_round, others, repeats, quiet_threshold=quiet_threshold, max_rounds=max_rounds,
            time_budget_s=time_budget_s, wait_quiet_s=wait_quiet_s,
        )  # fmt: skip
    return others


def ratio(model: Entry, ref: Entry, batch: int) -> float:
    """Median over rounds of ref time / model time at ``batch`` (> 1: ``model`` is faster)."""
    return statistics.median(r / m for r, m in zip(ref.times(batch), model.times(batch), strict=True))


# ------------------------------------------------------------------------------------------------ report
def markdown(entries: list[Entry], sizes: dict[str, float | None], acc: dict[str, dict[str, float]] | None,
             meta: dict[str, Any]) -> str:
    bs = meta["batches"]
    ref = next(e for e in entries if e.form == REFERENCE)
    lines = [
        f"Model: {meta['model']}; input {meta['input_shape']} per sample.",
        "",
        f"uniperception {meta['uniperception']} ({meta['git']}), torch {meta['torch']}, onnxruntime "
        f"{meta['onnxruntime']}, {meta['threads']} threads, {meta['cpu']}, {meta['date']}; malloc env set: "
        f"{'yes' if meta['malloc_env_set'] else 'NO'}; {meta['rounds']} round-robin rounds, {rounds_note(meta)} "
        f"CPU share {100 * meta['cpu_share']:.0f}% (process CPU time / (wall × threads) of the timed calls); "
        f"other processes used {100 * meta['other_load']:.0f}% of the machine's CPU (median of rounds used).",
        "",
        "| Runtime | File (MiB) | " + " | ".join(f"samples/s b{b}" for b in bs) + f" | IQR b{max(bs)} | "
        + " | ".join(f"× {REFERENCE} b{b}" for b in bs) + " | Test top-1 |",
        "|---|--:|" + "--:|" * len(bs) + "--:|" + "--:|" * len(bs) + "--:|",
    ]
    for e in entries:
        size = sizes.get(e.form)
        a = (acc or {}).get(e.form)
        lines.append(
            f"| {e.form} | {'' if size is None else f'{size:.2f}'} | "
            + " | ".join(f"{e.throughput(b):.1f}" for b in bs)
            + f" | ±{e.throughput_iqr_pct(max(bs)) / 2:.0f}% | "
            + " | ".join(f"{ratio(e, ref, b):.2f}" for b in bs)
            + f" | {'' if a is None else format(100 * a['top1'], '.1f') + ' %'} |"
        )
    lines += ["", f"Ratios: median over rounds of the per-round time ratio to {REFERENCE} (> 1 = faster). "
              f"IQR: half the inter-quartile range of the per-round batch-{max(bs)} times, relative to the median. "
              "File sizes: eager rows give the bundle's model.safetensors."]
    lines += ["", f"{meta['compile']} {meta['forms_note']}".strip()]
    if acc:
        n = next(iter(acc.values()))["n"]
        first = next(iter(acc))
        lines += ["", f"Test split ({meta['dataset']}, {n} samples, through the bundle's processor): top-1 "
                  f"agreement with {first} (float32) and the largest |Δ logit|: "
                  + "; ".join(f"{k} {100 * v['agreement']:.1f} % / {v['max_abs_logit_diff']:.2e}"
                              for k, v in acc.items() if k != first) + "."]
    else:
        lines += ["", f"Accuracy: {meta['accuracy_note']}"]
    lines += ["", "Exports: " + " ".join(meta["exports"]), "", f"Command: `{meta['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("bundle", nargs="?", help=f"bundle name or directory (default {DEFAULT_BUNDLE} if shipped, "
                    "else a random unireplknet_a image model)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 16)")
    ap.add_argument("--repeats", type=int, default=None, help="quiet rounds wanted (default 10; quick 3)")
    ap.add_argument("--max-rounds", type=int, default=None, help="cap on rounds (default 3 × --repeats)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed round-robin rounds (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    ap.add_argument("--img-size", type=int, default=224, help="input size of the random image model (default 224)")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop starting rounds after this long")
    ap.add_argument("--quiet-threshold", type=float, default=0.1, metavar="FRACTION",
                    help="rounds with other processes above this CPU share are left out (default 0.1)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="after a contended round, sleep until quiet, up to this long in all (default 0)")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the test-split evaluation")
    ap.add_argument("--limit", type=int, help="evaluate only the first N test samples")
    ap.add_argument("--ort-spinning", action="store_true", help="let onnxruntime's idle threads spin")
    ap.add_argument("--out-dir", help="keep the ONNX files here (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up, no torch.compile")
    args = ap.parse_args(argv)

    import onnxruntime

    batches = sorted(set(args.batch or [1, 16]))
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = 1 if args.quick else args.warmup
    torch.set_num_threads(args.threads)
    warn_malloc_env()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

    p, label, directory = load_model(args.bundle, args.img_size, args.seed)
    deploy = reparameterize(copy.deepcopy(p)).eval()
    tmp = None if args.out_dir else tempfile.TemporaryDirectory()
    out_dir = Path(args.out_dir or tmp.name)  # type: ignore[union-attr]
    out_dir.mkdir(parents=True, exist_ok=True)
    print("exporting", file=sys.stderr, flush=True)
    reports = {"onnxruntime float32": export(p, out_dir / "model.onnx"),
               "onnxruntime int8": export(p, out_dir / "model.int8.onnx", quantize="int8")}
    shape = tuple(json.loads(reports["onnxruntime float32"].sidecar.read_text())["input_shape"][1:])
    # a bundle saved in deploy form (``[bundle] deploy = true`` in its recipe) has no training form left to time
    has_training_form = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in p.modules())
    runners: dict[str, Runner] = {"eager training": p} if has_training_form else {}
    runners["eager deploy"] = deploy
    runners |= {k: ort_runner(r.path, args.threads, args.ort_spinning) for k, r in reports.items()}
    compile_note = "torch.compile: left out (--no-compile / --quick)."
    if not (args.no_compile or args.quick):
        print("compiling", file=sys.stderr, flush=True)
        compiled, compile_note = compile_runner(deploy, shape, batches)
        if compiled is not None:
            runners["torch.compile deploy"] = compiled
    mib = 2.0**20
    st = directory / "model.safetensors" if directory else None
    st_size = st.stat().st_size / mib if st and st.is_file() else None
    sizes = {"eager training": st_size, "eager deploy": st_size} | {
        k: r.path.stat().st_size / mib for k, r in reports.items()}

    acc = None
    data = recipe_data(directory) if directory else None
    note = "no test split: the model is randomly initialised" if directory is None else \
        "the bundle's card records no training data (config.json card.data)"
    if data is not None and not args.no_accuracy:
        print(f"evaluating on the {data['dataset']} test split", file=sys.stderr, flush=True)
        tb = split_batches(p, data, args.limit)
        acc = evaluate_runners({k: v for k, v in runners.items() if k != "torch.compile deploy"}, tb,
                               reference=next(iter(runners)))
    elif args.no_accuracy:
        note = "skipped (--no-accuracy)"

    entries = [Entry(label, form, run) for form, run in runners.items()]
    others = run_rounds(entries, shape, batches, repeats, warmup, args.max_rounds or 3 * repeats,
                        args.quiet_threshold, args.time_budget, args.wait_quiet, args.seed)
    use = quiet_rounds(others, args.quiet_threshold)
    for e in entries:
        e.use = use
    threads = torch.get_num_threads()
    meta = base_meta(threads) | {
        "model": label, "input_shape": ["batch", *shape], "onnxruntime": onnxruntime.__version__,
        "batches": batches, "rounds": len(others), "rounds_used": len(use),
        "contended": sum(not f > args.quiet_threshold for f in others) < 3,
        "quiet_threshold": args.quiet_threshold, "other_load": statistics.median(others[i] for i in use),
        "other_load_per_round": others, "ort_spinning": args.ort_spinning,
        "cpu_share": cpu_share([e.batch_s[b][i] for e in entries for b in batches for i in use],
                               [e.batch_cpu_s[b][i] for e in entries for b in batches for i in use], threads),
        "compile": compile_note, "dataset": (data or {}).get("dataset"), "accuracy_note": note,
        "exports": [r.summary() + "." for r in reports.values()],
        "forms_note": "" if has_training_form else "The bundle stores the deploy (re-parameterised) form, so there "
        "is no training-form row.",
    }
    print(markdown(entries, sizes, acc, meta))
    if args.json:
        ref = next(e for e in entries if e.form == REFERENCE)
        result = {
            "meta": meta, "file_size_mib": sizes, "accuracy": acc,
            "runtimes": [{"form": e.form, "throughput": {b: e.throughput(b) for b in batches},
                          f"ratio_vs_{REFERENCE.replace(' ', '_')}": {b: ratio(e, ref, b) for b in batches},
                          "batch_times_s": e.batch_s, "batch_cpu_times_s": e.batch_cpu_s} for e in entries],
            "export_sidecars": {k: json.loads(r.sidecar.read_text()) for k, r in reports.items()},
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
