"""Training faults: a killed run resumes to the same bits, a NaN stops cleanly, a bad output disk fails early.

* a tiny Trainer run in a subprocess is SIGKILLed once its first checkpoint exists; resumed, it ends with
  bit-identical weights and identical metrics (history and ``metrics.jsonl``) to an uninterrupted run;
* a NaN loss — or a finite loss with non-finite gradients — stops with a ``TrainingError`` naming the step;
  no weights are updated and no checkpoint with NaN weights is written (the previous one stays);
* an unwritable output directory and a disk without room for a checkpoint fail before the first step, with a
  message saying so; a write that fails mid-run (``RLIMIT_FSIZE``: a real EFBIG from ``write``, and a
  monkeypatched ``ENOSPC``) raises a clear ``TrainingError`` and leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _reliability import (
    comparable,
    file_size_limit,
    python_process,
    read_metrics,
    record,
    run_tiny_training,
    tiny_model,
    tiny_trainer,
)

from uniperception.errors import TrainingError
from uniperception.training import Callback

pytestmark = pytest.mark.timeout(300)

TRAIN_CHILD = """
import sys, time
from _reliability import run_tiny_training
from uniperception.training import Callback

class Slow(Callback):  # after the first epoch, slow down (no effect on the numbers) so the kill lands mid-run
    def after_optimizer_step(self, trainer):
        if trainer.epoch >= 1:
            time.sleep(0.3)

run_tiny_training(sys.argv[1], threads=int(sys.argv[2]), callbacks=(Slow(),))
"""


def _finite(sd: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    straight = run_tiny_training(str(tmp_path / "straight"), threads)

    run = tmp_path / "killed"
    child = python_process(TRAIN_CHILD, str(run), str(threads))
    try:
        deadline = time.monotonic() + 180
        while not (run / "epoch0001.pt").exists():
            assert child.poll() is None, "the training subprocess died before its first checkpoint"
            assert time.monotonic() < deadline, "no first checkpoint within 180 s"
            time.sleep(0.01)
        time.sleep(random.Random(int(os.environ.get("UNIPERCEPTION_KILL_SEED", "0"))).uniform(0.0, 0.3))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run finished before it was killed"
    at_kill = torch.load(run / "last.pt", weights_only=True)
    assert at_kill["epoch"] < 3
    record("training/sigkill-resume", f"killed with the epoch-{at_kill['epoch']} checkpoint on disk")

    resumed = run_tiny_training(str(run), threads, resume=True, seed=123)  # other init: all state from disk
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ema_a, ema_b = straight.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), "resumed EMA weights differ"
    assert comparable(resumed.history) == comparable(straight.history)
    assert comparable(read_metrics(run / "metrics.jsonl")) == comparable(read_metrics(tmp_path / "straight" /
                                                                                     "metrics.jsonl"))
    record("training/sigkill-resume", "resumed bit-identical (weights, EMA, metrics)")


class _Bad:
    """A loss that turns bad at one training step: NaN itself, or finite with non-finite gradients."""

    def __init__(self, kind: str, at_step: int) -> None:
        self.kind, self.at_step = kind, at_step
        self.trainer: Any = None

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out, target)
        if not out.requires_grad or self.trainer.step + 1 != self.at_step:
            return loss
        if self.kind == "nan-loss":
            return loss * float("nan")
        return loss + (out - out.detach()).abs().sqrt().sum()  # value +0, gradient of sqrt at 0: inf·0 = NaN


@pytest.mark.parametrize("at_step", [7, 10], ids=["mid-epoch", "last-step-of-an-epoch"])
@pytest.mark.parametrize("kind", ["nan-loss", "nan-gradient"])
def test_non_finite_step_stops_naming_the_step_and_writes_no_nan(kind: str, at_step: int, tmp_path: Path) -> None:
    bad = _Bad(kind, at_step)
    trainer = tiny_trainer(tiny_model(), tmp_path, loss_fn=bad)  # 5 steps per epoch: step 7 and 10 are epoch 2
    bad.trainer = trainer
    with pytest.raises(TrainingError, match=rf"epoch 2, step {at_step}\b") as info:
        trainer.fit()
    assert ("loss became nan" if kind == "nan-loss" else "gradients became non-finite") in str(info.value)
    assert trainer.step == at_step - 1, "the bad step was applied"
    assert _finite(trainer.model.state_dict()), "NaN reached the weights in memory"
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch0001.pt", "last.pt"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and _finite(last["model"])
    assert [m["epoch"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    record("training/non-finite", f"{kind} at step {at_step}: stopped, no NaN written")


@pytest.mark.parametrize("how", ["path-under-a-file", "chmod-0o500"])
def test_unwritable_output_dir_fails_before_the_first_step(how: str, tmp_path: Path) -> None:
    if how == "chmod-0o500":
        if os.geteuid() == 0:
            pytest.skip("running as root: permission bits do not stop root (path-under-a-file covers it)")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    else:
        (tmp_path / "file").write_text("a regular file cannot hold a directory")
        out = tmp_path / "file" / "run"
    calls = []
    trainer = tiny_trainer(tiny_model(), out, loss_fn=lambda o, t: calls.append(1) or F.cross_entropy(o, t))
    t0 = time.monotonic()
    try:
        with pytest.raises(TrainingError, match="not writable") as info:
            trainer.fit()
    finally:
        if how == "chmod-0o500":
            out.chmod(0o700)
    assert str(out) in str(info.value)
    assert not calls and trainer.step == 0, "training started before the output directory was checked"
    record("training/unwritable-dir", f"{how}: failed in {time.monotonic() - t0:.2f} s, before step 1")


def test_disk_without_room_for_a_checkpoint_fails_before_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=64 * 1024))  # a nearly full disk
    calls = []
    trainer = tiny_trainer(tiny_model(), tmp_path, loss_fn=lambda o, t: calls.append(1) or F.cross_entropy(o, t))
    with pytest.raises(TrainingError, match=r"not enough disk space .* 0\.1 MiB free, a checkpoint needs about"):
        trainer.fit()
    assert not calls and trainer.step == 0
    assert not list(tmp_path.glob("*.pt"))
    record("training/disk-full", "no room at start: failed before step 1 (monkeypatched disk_usage)")


class _FailWritesAtEpoch(Callback):
    """From the end of epoch ``epoch`` on (just before its checkpoint), writes fail as on a full disk."""

    def __init__(self, epoch: int, stack: contextlib.ExitStack, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.epoch, self.stack, self.how, self.monkeypatch = epoch, stack, how, monkeypatch

    def on_epoch_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.epoch != self.epoch:
            return
        if self.how == "rlimit-efbig":  # the OS refuses to grow the file: write() fails with EFBIG
            size = (trainer.out_dir / "last.pt").stat().st_size
            self.stack.enter_context(file_size_limit(size // 2))
        else:  # the serializer dies with ENOSPC after writing part of the file
            real_save = torch.save

            def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
                Path(f).write_bytes(b"PARTIAL" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

            self.monkeypatch.setattr(torch, "save", full_disk)
            self.stack.callback(self.monkeypatch.setattr, torch, "save", real_save)


@pytest.mark.parametrize("how", ["rlimit-efbig", "monkeypatched-enospc"])
def test_disk_full_mid_run_keeps_the_previous_checkpoint(how: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with contextlib.ExitStack() as stack:
        trainer = tiny_trainer(tiny_model(), tmp_path, callbacks=(_FailWritesAtEpoch(2, stack, how, monkeypatch),))
        with pytest.raises(TrainingError, match=r"could not write checkpoint .*epoch0002\.pt") as info:
            trainer.fit()
        stack.close()  # the disk has room again
    message = str(info.value)
    assert "disk full" in message and "previous checkpoint is unchanged" in message
    if how == "monkeypatched-enospc":
        assert "No space left on device" in message
    before = torch.load(tmp_path / "last.pt", weights_only=True)
    assert before["epoch"] == 1 and _finite(before["model"])
    assert not list(tmp_path.glob(".*tmp")), "a partial temp file was left behind"
    assert not (tmp_path / "epoch0002.pt").exists()
    # once there is room again the run resumes from the surviving checkpoint and finishes
    resumed = tiny_trainer(tiny_model(seed=5), tmp_path)
    resumed.fit(resume=True)
    assert resumed.epoch == 3
    assert [m["epoch"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    record("training/disk-full", f"{how} at the epoch-2 checkpoint: clear error, epoch-1 checkpoint kept, resumed")


@contextlib.contextmanager
def _tiny_tmpfs(path: Path, size: int) -> Any:
    """A real, tiny filesystem (root only: mount a tmpfs); skips where mounting is not allowed."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE and ENOSPC variants cover this case")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the RLIMIT_FSIZE and ENOSPC variants cover it")
    try:
        yield path
    finally:
        busy = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
        if busy.returncode != 0:  # detach it anyway, then report the open file that kept it busy
            subprocess.run(["umount", "-l", str(path)], check=False)
            raise AssertionError(f"the tmpfs stayed busy (a file left open?): {busy.stderr.strip()}")


def test_real_full_disk_mid_run_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """On a tmpfs with room for the epoch-1 checkpoints only, the epoch-2 write hits a real ENOSPC."""
    probe = tiny_trainer(tiny_model(), tmp_path / "probe", epochs=1)
    probe.fit()
    size = (tmp_path / "probe" / "last.pt").stat().st_size
    with _tiny_tmpfs(tmp_path / "disk", int(2.6 * size)) as disk:
        trainer = tiny_trainer(tiny_model(), disk)
        with pytest.raises(TrainingError, match=r"could not write checkpoint .*epoch0002\.pt") as info:
            trainer.fit()
        assert "disk full" in str(info.value)
        last = torch.load(disk / "last.pt", weights_only=True)
        assert last["epoch"] == 1 and _finite(last["model"])
        assert not list(disk.glob(".*tmp")), "a partial temp file was left behind"
        st = os.statvfs(disk)
        assert st.f_bavail * st.f_frsize > size // 4, "the failed write's space was not given back (file still open)"
    record("training/disk-full", "real tmpfs ENOSPC at the epoch-2 checkpoint: clear error, epoch-1 kept, space freed")
