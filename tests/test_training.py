"""The training engine: it learns, resumes exactly, fails loudly, and runs under torchrun DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from uniperception import Perceiver
from uniperception.errors import InvalidInputError, TrainingError
from uniperception.training import AdapterCollate, TrainConfig, Trainer, load_recipe

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_sizes": ((3,), (7,), (3,), (3,))}


class Digits(Dataset):
    """scikit-learn's 8×8 handwritten digits as RGB uint8 images (real data, shipped with the package)."""

    def __init__(self, split: str, n: int = 400, classes: int = 4):
        from sklearn.datasets import load_digits

        d = load_digits()
        keep = d.target < classes
        x, y = d.images[keep], d.target[keep]
        x, y = (x[:n], y[:n]) if split == "train" else (x[n : n + 200], y[n : n + 200])
        self.x = (np.repeat(x[..., None], 3, -1) * 16).clip(0, 255).astype(np.uint8)
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _model(seed: int = 0) -> Perceiver:
    torch.manual_seed(seed)
    return Perceiver("image", labels=[str(i) for i in range(4)], adapter={"size": 32, "crop_pct": 1.0},
                     backbone_kwargs=TINY)


def _trainer(model: Perceiver, out: Path, n: int = 400, **cfg) -> Trainer:
    config = TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5, "out_dir": str(out),
                            "progress": False, **cfg})
    return Trainer(model, Digits("train", n=n), Digits("val", n=n), config,
                   collate_fn=AdapterCollate(model.adapter, train=True),
                   val_collate_fn=AdapterCollate(model.adapter), labels=model.labels)


def test_learns_real_digits_and_writes_logs(tmp_path):
    model = _model()
    history = _trainer(model, tmp_path, epochs=4, ema_decay=0.9).fit()
    assert history[-1]["val_acc1"] >= 0.7, history
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["epoch"] == 4
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "confusion.png").stat().st_size > 0
    assert (tmp_path / "last.pt").is_file() and len(list(tmp_path.glob("epoch*.pt"))) == 2  # keep_last


def test_resume_is_bit_identical(tmp_path):
    straight = _model()
    _trainer(straight, tmp_path / "a", n=160, epochs=3, ema_decay=0.9).fit()
    interrupted = _model()
    t = _trainer(interrupted, tmp_path / "b", n=160, epochs=3, ema_decay=0.9, max_steps=2 * 5)  # stops after epoch 2
    t.fit()
    assert t.epoch == 2
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    _trainer(resumed, tmp_path / "b", n=160, epochs=3, ema_decay=0.9).fit(resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ha = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_nan_loss_stops_with_the_step_and_writes_nothing(tmp_path):
    model = _model()

    def bad_loss(out, tgt):
        return out.sum() * float("nan")

    t = Trainer(model, Digits("train"), None, TrainConfig(epochs=1, out_dir=str(tmp_path), progress=False),
                collate_fn=AdapterCollate(model.adapter), loss_fn=bad_loss)
    with pytest.raises(TrainingError, match="step 1"):
        t.fit()
    assert not list(tmp_path.glob("*.pt"))


def test_unwritable_output_dir_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = _model()
    t = _trainer(model, blocker / "run")
    with pytest.raises(TrainingError, match="not writable"):
        t.fit()


def test_corrupt_resume_checkpoint(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="cannot read"):
        _trainer(_model(), tmp_path).fit(resume=True)
    with pytest.raises(TrainingError, match="not found"):
        _trainer(_model(), tmp_path).fit(resume=tmp_path / "nope.pt")


def test_config_validation_and_recipes(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 1})
    with pytest.raises(InvalidInputError):
        TrainConfig(amp="fp8")
    r = tmp_path / "r.toml"
    r.write_text('[train]\nepochs = 3\nlr = 0.01\n')
    assert load_recipe(r)["train"]["epochs"] == 3
    with pytest.raises(InvalidInputError, match="no recipe"):
        load_recipe("does-not-exist")


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_training import Digits, _model
    from uniperception.training import AdapterCollate, TrainConfig, Trainer
    model = _model()
    cfg = TrainConfig(epochs=1, batch_size=16, out_dir={out!r}, progress=False)
    t = Trainer(model, Digits("train", n=128), Digits("val", n=128), cfg,
                collate_fn=AdapterCollate(model.adapter, train=True), val_collate_fn=AdapterCollate(model.adapter))
    hist = t.fit()
    import torch.distributed as dist
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, w)
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    print("rank", dist.get_rank(), "steps", t.step, "ok", flush=True)
    # tear down in step: drop the DDP wrapper (its reducer holds the process group) and let both ranks
    # arrive before either destroys the group, so neither exits while the other's gloo threads still talk
    del t, hist
    import gc
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.timeout(300)
def test_torchrun_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "run")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(script)], capture_output=True, text=True, timeout=280, env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count(" ok") == 2
    # every gradient has its parameter's exact strides: DDP can use its bucket views without copies
    assert "Grad strides do not match" not in out.stderr
    # 128 samples / (2 ranks × 16) = 4 optimiser steps per rank; only rank 0 wrote files
    assert "steps 4" in out.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_keep_freed_memory_is_idempotent_and_glibc_only() -> None:
    import sys

    from uniperception._alloc import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first
    if sys.platform.startswith("linux"):
        import platform

        assert first == (platform.libc_ver()[0] == "glibc")
