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
* ``malloc-env+no-tcache``: the same plus ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``;
* ``thp`` / ``malloc-env+thp``: PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (allocations of 2 MiB and more
  2 MiB-aligned and ``madvise(MADV_HUGEPAGE)``, fewer but larger faults), without and with the MALLOC_*
  variables.

Run::

    .venv/bin/python benchmarks/alloc_reuse.py --processes 6

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
    "malloc-env+no-tcache": {**MALLOC_ENV, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "malloc-env+thp": {**MALLOC_ENV, "THP_MEM_ALLOC_ENABLE": "1"},
}


def probe(mb: int, calls: int) -> dict[str, float]:
    """In this process: median ms and mean minor faults per fresh ``x * x`` (after two warm-up calls)."""
    import torch

    torch.set_num_threads(2)
    x = torch.randn(mb * (1 << 20) // 4)
    for _ in range(2):
        y = x * x
        del y
    times, faults = [], []
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        y = x * x
        times.append((time.perf_counter() - t0) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        del y
    return {"ms": statistics.median(times), "faults": statistics.mean(faults)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=6, help="fresh processes per variant")
    ap.add_argument("--calls", type=int, default=8, help="timed products per process")
    ap.add_argument("--mb", type=int, default=64, help="tensor size in MiB (UniRepLKNet-A's widest at b32: 64)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.mb, args.calls)))
        return
    if args.processes < 1 or args.calls < 1 or args.mb < 1:
        raise SystemExit("--processes, --calls and --mb must be positive")
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", *MALLOC_ENV)}
    rows = []
    for name, extra in VARIANTS.items():
        runs = []
        for _ in range(args.processes):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--probe", "--mb", str(args.mb), "--calls", str(args.calls)],
                env={**base, **extra}, capture_output=True, text=True, timeout=600, check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[-1]}", file=sys.stderr)
        rows.append((name, runs))
    m = base_meta(2)
    print(f"uniperception {m['uniperception']} ({m['git']}), torch {m['torch']}, {m['cpu']}, 2 threads, {m['date']}")
    print()
    print(f"Fresh `x * x` of a {args.mb} MiB float32 tensor, {args.calls} calls in each of {args.processes} processes:")
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
