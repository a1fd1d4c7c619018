"""Does this machine's allocator hand large freed CPU tensors back, or fresh pages that fault on first touch?

A training step allocates and frees many activation-sized tensors (tens of MB each). When glibc's malloc
reuses a freed block the next same-sized tensor costs only its compute; when it does not, every page of the
new block is faulted in by the kernel on first write (~0.3 ms per MB on the project VMs), which can dominate
elementwise ops (GELU, its backward, products). PyTorch allocates CPU tensors with ``posix_memalign(64)``;
the alignment fragment glibc splits off in front of such a block goes to its per-thread cache (tcache)
and stays marked in use, so the freed block cannot merge with it and the next request (block + alignment
slack) does not fit: malloc takes fresh heap pages instead. Whether that happens depends on where the heap
happens to be, so it differs from process to process.

For each environment variant this script starts ``--processes`` fresh Python processes; each times
``--calls`` products ``x * x`` of a ``--mb``-sized float32 tensor (a new output every call, freed before
the next) and counts the minor page faults per call (``getrusage``). Variants:

* ``default``: the environment as given;
* ``malloc-env``: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` as the other benchmarks ask
  (large blocks from the heap, never returned to the OS);
* ``keep_freed_memory``: the same thresholds raised at run time by :func:`uniperception.keep_freed_memory`
  (what the CLI and the Trainer do on CPU);
* ``malloc-env+no-tcache``: the same plus ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``;
* ``thp`` / ``malloc-env+thp``: PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (allocations of 2 MiB and more
  2 MiB-aligned and ``madvise(MADV_HUGEPAGE)``, fewer but larger faults), without and with the MALLOC_*
  variables.

Run::

    .venv/bin/python benchmarks/alloc_reuse.py --processes 6
    .venv/bin/python benchmarks/alloc_reuse.py --processes 4 --calls 30 --workload a-b1

Markdown goes to stdout. Nothing is asserted about wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

try:
    from _common import MALLOC_ENV, base_meta
except ImportError:  # run as ``python -m benchmarks.alloc_reuse``
    from benchmarks._common import MALLOC_ENV, base_meta

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "malloc-env": dict(MALLOC_ENV),
    # the same thresholds raised at run time by the package (what the CLI and the Trainer do on CPU)
    "keep_freed_memory": {"_ALLOC_REUSE_MALLOPT": "1"},
    "malloc-env+no-tcache": {**MALLOC_ENV, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "malloc-env+thp": {**MALLOC_ENV, "THP_MEM_ALLOC_ENABLE": "1"},
}


def probe(mb: int, calls: int, workload: str) -> dict[str, float]:
    """In this process: median ms and mean minor faults per call (after warm-up calls).

    ``mul``: a fresh ``x * x`` of an ``mb`` MiB tensor; ``a-b1``: one batch-1 224² forward of UniRepLKNet-A in
    its deploy form (inference mode), i.e. what the allocator costs a real small call.
    """
    import torch

    if os.environ.get("_ALLOC_REUSE_MALLOPT") == "1":
        from uniperception import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(2)
    if workload == "mul":
        x = torch.randn(mb * (1 << 20) // 4)

        def call() -> None:
            y = x * x
            del y

        warmup = 2
    else:
        import uniperception as up

        torch.manual_seed(0)
        model = up.create_model("unireplknet_a", num_classes=1000).eval()
        model.reparameterize()
        img = torch.randn(1, 3, 224, 224)

        def call() -> None:
            with torch.inference_mode():
                model(img)

        warmup = 5
    for _ in range(warmup):
        call()
    times, faults = [], []
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"ms": statistics.median(times), "faults": statistics.mean(faults)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=6, help="fresh processes per variant")
    ap.add_argument("--calls", type=int, default=8, help="timed products per process")
    ap.add_argument("--mb", type=int, default=64, help="tensor size in MiB (UniRepLKNet-A's widest at b32: 64)")
    ap.add_argument("--workload", choices=("mul", "a-b1"), default="mul",
                    help="mul: fresh x*x of --mb MiB; a-b1: UniRepLKNet-A deploy forward at batch 1")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.mb, args.calls, args.workload)))
        return
    if args.processes < 1 or args.calls < 1 or args.mb < 1:
        raise SystemExit("--processes, --calls and --mb must be positive")
    drop = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "_ALLOC_REUSE_MALLOPT", *MALLOC_ENV)
    base = {k: v for k, v in os.environ.items() if k not in drop}
    rows = []
    for name, extra in VARIANTS.items():
        runs = []
        for _ in range(args.processes):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--probe", "--mb", str(args.mb), "--calls", str(args.calls),
                 "--workload", args.workload],
                env={**base, **extra}, capture_output=True, text=True, timeout=600, check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[-1]}", file=sys.stderr)
        rows.append((name, runs))
    m = base_meta(2)
    print(f"uniperception {m['uniperception']} ({m['git']}), torch {m['torch']}, {m['cpu']}, 2 threads, {m['date']}")
    print()
    what = (f"Fresh `x * x` of a {args.mb} MiB float32 tensor" if args.workload == "mul"
            else "UniRepLKNet-A deploy forward, batch 1, 224²")
    print(f"{what}, {args.calls} calls in each of {args.processes} processes:")
    print()
    print("| Variant | median ms per process | minor faults per call, per process | processes that reuse |")
    print("|---|---|---|--:|")
    for name, runs in rows:
        ms = ", ".join(f"{r['ms']:.1f}" for r in runs)
        fl = ", ".join(f"{r['faults']:.0f}" for r in runs)
        # a process reuses when a call faults (almost) never: not even once per 2 MiB huge page
        reuse = sum(r["faults"] < args.mb / 2 for r in runs)
        print(f"| {name} | {ms} | {fl} | {reuse}/{len(runs)} |")


if __name__ == "__main__":
    main()
