"""Reports the reliability figures (fuzz cases tried, faults injected, outcomes) at the end of the run.

``UNIPERCEPTION_RELIABILITY_REPORT=path.json`` also writes them as JSON (what docs/reliability.md quotes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import torch
from _reliability import FIGURES, FUZZ_EXAMPLES, KILL_ROUNDS


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not FIGURES:
        return
    tr = terminalreporter
    tr.section(f"reliability figures (UNIPERCEPTION_FUZZ_EXAMPLES={FUZZ_EXAMPLES}, KILL_ROUNDS={KILL_ROUNDS})")
    for test in sorted(FIGURES):
        counts = FIGURES[test]
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        tr.write_line(f"{test}: {detail}")
    path = os.environ.get("UNIPERCEPTION_RELIABILITY_REPORT")
    if path:
        data = {"fuzz_examples": FUZZ_EXAMPLES, "kill_rounds": KILL_ROUNDS,
                "figures": {t: dict(sorted(c.items())) for t, c in sorted(FIGURES.items())}}
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run these small workloads on one intra-op thread: on a busy 2-core machine, OpenMP threads waiting for
    each other make tiny ops 10× slower. (Subprocesses are given the same count, so results stay comparable.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
