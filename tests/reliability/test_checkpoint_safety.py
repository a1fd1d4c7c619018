"""Checkpoints and bundles: no pickle runs code, corrupt files are clear errors, writes are atomic.

* a ``.pth`` carrying a ``__reduce__`` payload (that would create a file) is refused by every loader without
  the payload running — checked against an unrestricted load that does run it;
* a truncated or bit-flipped ``.safetensors`` written by uniperception raises ``CheckpointError`` (never silently
  different weights: the file carries a SHA-256 digest of its tensors);
* ``save_state_dict``, ``Perceiver.save_pretrained`` and training checkpoints survive ``SIGKILL`` in the middle
  of a write (a writer subprocess killed at random moments) and a failing write (``RLIMIT_FSIZE``, the way a
  full disk fails ``write``): the previous file stays intact and loadable.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _reliability import (
    KILL_ROUNDS,
    TINY,
    WRITER_KINDS,
    file_size_limit,
    python_process,
    record,
    tiny_model,
    tiny_trainer,
    writer_setup,
)
from safetensors.torch import save_file

from uniperception import Perceiver
from uniperception.backbones import UniRepLKNet
from uniperception.checkpoints import DIGEST_KEY, load_official, read_checkpoint, save_state_dict
from uniperception.errors import CheckpointError, TrainingError

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------------ pickles
class Payload:
    """Unpickling this runs ``kind`` — each variant creates ``marker``."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        m = self.marker
        if self.kind == "open":
            return builtins.open, (m, "w")
        if self.kind == "exec":
            return builtins.exec, (f"open({m!r}, 'w').close()",)
        if self.kind == "eval":
            return builtins.eval, (f"open({m!r}, 'w').close()",)
        if self.kind == "os.system":
            return os.system, (f"touch '{m}'",)
        return subprocess.call, (["touch", m],)


PAYLOADS = ["open", "exec", "eval", "os.system", "subprocess"]
FORMATS = ["zip", "legacy", "pickle-p0", "pickle-p2", "pickle-p5"]
PLACEMENTS = ["tensor-slot", "top-level", "argparse-namespace", "nested-list"]
LOADERS = ["read_checkpoint", "load_official", "Perceiver.from_pretrained(file)", "Perceiver.from_pretrained(bundle)",
           "Trainer.fit(resume)"]


def _object(placement: str, payload: Payload) -> Any:
    weights = {"head.weight": torch.zeros(2, 2)}
    if placement == "tensor-slot":
        return {"model": {**weights, "head.bias": payload}}
    if placement == "top-level":
        return payload
    if placement == "argparse-namespace":  # the one class the loader allows (official RepLKNet/SLaK files)
        return {"model": weights, "args": argparse.Namespace(model="x", hook=payload)}
    return {"state_dict": weights, "extra": [1, {"x": payload}]}


def _write(path: Path, obj: Any, fmt: str) -> None:
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(fmt[-1])))


def _load_with(loader: str, path: Path, tmp: Path) -> None:
    if loader == "read_checkpoint":
        read_checkpoint(path)
    elif loader == "load_official":
        load_official(UniRepLKNet(num_classes=2, **TINY), path)
    elif loader == "Perceiver.from_pretrained(file)":
        Perceiver.from_pretrained(path)
    elif loader == "Perceiver.from_pretrained(bundle)":
        bundle = tmp / "bundle"
        if not bundle.is_dir():
            tiny_model().save_pretrained(bundle)
        (bundle / "model.safetensors").write_bytes(path.read_bytes())
        Perceiver.from_pretrained(bundle)
    else:
        tiny_trainer(tiny_model(), tmp / "run").fit(resume=path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_pickle_payload_is_refused_without_running(kind: str, fmt: str, tmp_path: Path) -> None:
    # the payload is live: an unrestricted load runs it (so the assertions below can fail)
    live = tmp_path / "live-marker"
    _write(tmp_path / "live.pth", _object("tensor-slot", Payload(kind, live)), fmt)
    if fmt in ("zip", "legacy"):
        torch.load(tmp_path / "live.pth", weights_only=False)
    else:
        pickle.loads((tmp_path / "live.pth").read_bytes())
    assert live.exists(), "the payload did not run under an unrestricted load: the test proves nothing"

    for placement in PLACEMENTS:
        marker = tmp_path / f"pwned-{placement}"
        path = tmp_path / "unireplknet_a_in1k_224_acc77.03.pth"  # a name from_pretrained maps to an architecture
        _write(path, _object(placement, Payload(kind, marker)), fmt)
        for loader in LOADERS:
            expected = TrainingError if loader.startswith("Trainer") else CheckpointError
            with pytest.raises(expected) as info:
                _load_with(loader, path, tmp_path)
            assert not marker.exists(), f"{loader} executed a pickled {kind} payload ({fmt}, {placement})"
            assert len(str(info.value)) > 30
            record("checkpoints/pickle-payloads", f"refused ({loader.split('(')[0]})")


# ------------------------------------------------------------------------------------------------ corrupt files
def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("written")
    sd = {"a.weight": torch.randn(4, 3), "b": torch.arange(5), "c.h": torch.randn(2).half(), "z": torch.tensor(3.0),
          "e": torch.zeros(0), "bf": torch.randn(3).bfloat16()}
    small = save_state_dict(sd, d / "small.safetensors")
    model = tiny_model()
    bundle = model.save_pretrained(d / "bundle")
    return {"sd": sd, "small": small, "bundle": bundle, "bundle_sd": read_checkpoint(bundle / "model.safetensors")}


def test_every_truncation_of_a_safetensors_file_is_a_checkpoint_error(written: dict[str, Any], tmp_path: Path) -> None:
    for name, src in (("state dict", written["small"]), ("bundle", written["bundle"] / "model.safetensors")):
        data = src.read_bytes()
        cuts = range(len(data)) if len(data) < 2000 else sorted({*range(0, 100), *random.Random(0).sample(
            range(len(data)), 200)})
        for n in cuts:
            bad = tmp_path / "cut.safetensors"
            bad.write_bytes(data[:n])
            with pytest.raises(CheckpointError, match=r"truncated|corrupt|empty"):
                read_checkpoint(bad)
            record(f"checkpoints/safetensors-truncated/{name}", "CheckpointError")


def test_every_bit_flip_in_a_safetensors_file_is_an_error_or_harmless(written: dict[str, Any], tmp_path: Path) -> None:
    """A flipped bit is a CheckpointError unless it hit a byte with no bearing on the tensors (e.g. the JSON
    padding or a metadata value) — then the tensors read back are exactly the written ones."""
    rng = random.Random(0)
    for name, src, ref in (("state dict", written["small"], written["sd"]),
                           ("bundle", written["bundle"] / "model.safetensors", written["bundle_sd"])):
        data = src.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        positions = list(range(len(data))) if len(data) < 2000 else rng.sample(range(header), 300) + rng.sample(
            range(header, len(data)), 150)
        for i in positions:
            buf = bytearray(data)
            buf[i] ^= 1 << rng.randrange(8)
            bad = tmp_path / "flipped.safetensors"
            bad.write_bytes(bytes(buf))
            try:
                out = read_checkpoint(bad)
            except CheckpointError:
                record(f"checkpoints/safetensors-bit-flips/{name}", "CheckpointError")
                continue
            assert _same(out, ref), f"flipping a bit of byte {i} silently changed the tensors"
            record(f"checkpoints/safetensors-bit-flips/{name}", "harmless (identical tensors)")
    # a bundle with a flipped data bit does not load (Perceiver.from_pretrained goes through read_checkpoint)
    bundle = written["bundle"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((bundle / "config.json").read_bytes())
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[-5] ^= 0x10
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        Perceiver.from_pretrained(broken)


def test_files_without_a_digest_still_load_and_still_fail_when_truncated(tmp_path: Path) -> None:
    """Official/third-party safetensors carry no digest: they load as before; truncation is still caught."""
    sd = {"w": torch.randn(8, 8)}
    save_file(sd, tmp_path / "plain.safetensors")
    assert _same(read_checkpoint(tmp_path / "plain.safetensors"), sd)
    data = (tmp_path / "plain.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-7])
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "cut.safetensors")
    from safetensors import safe_open

    with safe_open(str(save_state_dict(sd, tmp_path / "ours.safetensors")), "pt") as fh:
        assert DIGEST_KEY in fh.metadata()


# ------------------------------------------------------------------------------------------------ atomic writes
ZYGOTE = """
from _reliability import writer_zygote
writer_zygote()
"""


def _progress(root: Path) -> list[tuple[int, str]]:
    lines = (root / "progress.log").read_text().splitlines() if (root / "progress.log").is_file() else []
    return [(int(g), kind) for g, kind in (ln.split() for ln in lines if len(ln.split()) == 2)]


def _values(sd: dict[str, torch.Tensor]) -> set[float]:
    """The distinct values of a state dict's floating tensors (each is constant in these files)."""
    return {float(x) for t in sd.values() if t.is_floating_point() and t.numel() for x in (t.min(), t.max())}


def _check_files(root: Path, low: dict[str, int], loader: Any, full: bool) -> dict[str, int]:
    """Every file loads whole: one generation ``g`` throughout, ``low[kind] ≤ g ≤ low[kind] + 1``.

    ``loader`` is a Trainer whose ``load_checkpoint`` must accept the training checkpoint; ``full`` also loads the
    bundle with ``Perceiver.from_pretrained`` (building a model each round would dominate the test's time)."""
    import json

    from uniperception.training.engine import CHECKPOINT_FORMAT

    found: dict[str, int] = {}
    for kind in ("sd.safetensors", "sd.pth"):
        sd = read_checkpoint(root / kind)
        g = int(sd["g"])
        assert torch.equal(sd["w"], torch.full_like(sd["w"], float(g))), f"{kind} mixes generations"
        found[kind] = g
    json.loads((root / "bundle" / "config.json").read_text())
    values = _values(read_checkpoint(root / "bundle" / "model.safetensors"))
    if full:
        values |= _values(Perceiver.from_pretrained(root / "bundle").state_dict())
    assert len(values) == 1, f"the bundle mixes generations {sorted(values)[:5]}"
    found["bundle"] = int(values.pop())
    state = torch.load(root / "run" / "last.pt", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT
    assert _values(state["model"]) == {float(state["epoch"])}, "the training checkpoint mixes generations"
    found["trainer"] = int(state["epoch"])
    loader.load_checkpoint(root / "run" / "last.pt")  # the engine's own loader accepts it
    assert loader.epoch == found["trainer"]
    for kind, g in found.items():
        assert low[kind] <= g <= low[kind] + 1, f"{kind}: generation {g}, expected {low[kind]} or the next"
    return found


@pytest.mark.timeout(max(300, 30 * KILL_ROUNDS))
def test_sigkill_mid_write_leaves_the_previous_files_intact(tmp_path: Path) -> None:
    """A writer (forked from a warm process) is SIGKILLed at a random moment, ``KILL_ROUNDS`` times; after every
    kill each of the four files loads whole, holding the last finished generation or the one being written."""
    rng = random.Random(int(os.environ.get("UNIPERCEPTION_KILL_SEED", "0")))
    root = tmp_path / "files"
    zygote = python_process(ZYGOTE, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert zygote.stdin is not None and zygote.stdout is not None
    done: dict[str, int] = {}
    loader = writer_setup()
    try:
        for rnd in range(KILL_ROUNDS):
            start = 1000 * (rnd + 1)
            zygote.stdin.write(f"{root} {start}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            deadline = time.monotonic() + 120
            first = None
            while True:  # one full generation written by this writer
                mine = [(g, k) for g, k in _progress(root) if g >= start]
                if mine and first is None:
                    first = time.monotonic()
                if {k for g, k in mine if g == start} == set(WRITER_KINDS):
                    break
                assert time.monotonic() < deadline, "the writer made no progress"
                time.sleep(0.005)
            period = max(0.05, time.monotonic() - (first or time.monotonic()))
            time.sleep(rng.uniform(0.0, 1.5 * period))  # somewhere in the next generation(s)
            os.kill(pid, signal.SIGKILL)
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            for g, kind in _progress(root):  # generations finished before the kill
                done[kind] = max(done.get(kind, 0), g)
            leftovers = [p.name for p in root.rglob(".*tmp")]
            record("atomic-writes/sigkill", "kills")
            record("atomic-writes/sigkill", "kills that interrupted a write (temp file left)", int(bool(leftovers)))
            found = _check_files(root, done, loader, full=rnd in (0, KILL_ROUNDS - 1))
            record("atomic-writes/sigkill", "files verified intact after a kill", len(found))
            for p in root.rglob(".*tmp"):  # what a supervisor would clean up; loading must not need it
                p.unlink()
            done = found
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait(timeout=60)


def _open_files_under(d: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return []
    out = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(d)):
                out.append(target)
    return out


def test_a_failing_write_keeps_the_previous_file(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes write() fail like a full disk: CheckpointError, old file intact, no temp file."""
    for suffix in (".safetensors", ".pth"):
        target = tmp_path / f"w{suffix}"
        old = {"w": torch.arange(10.0)}
        save_state_dict(old, target)
        before = target.read_bytes()
        with file_size_limit(64 * 1024), pytest.raises(CheckpointError, match="could not write") as info:
            save_state_dict({"w": torch.randn(200_000)}, target)
        assert "disk" in str(info.value)
        assert not _open_files_under(tmp_path), "the failed write still holds its (deleted) temp file open"
        assert target.read_bytes() == before
        assert _same(read_checkpoint(target), old)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        record("atomic-writes/failing-write", f"save_state_dict{suffix}: previous file kept")
    model = tiny_model()
    x = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    bundle = model.save_pretrained(tmp_path / "bundle")
    expected = Perceiver.from_pretrained(bundle).classify_image(x)
    bigger = Perceiver("image", labels=model.labels, adapter={"size": 16, "crop_pct": 1.0},
                       backbone_kwargs={**TINY, "dims": (64, 128, 256, 512)})
    with file_size_limit(256 * 1024), pytest.raises(CheckpointError):
        bigger.save_pretrained(bundle)
    assert Perceiver.from_pretrained(bundle).classify_image(x) == expected
    record("atomic-writes/failing-write", "save_pretrained: previous bundle kept")
