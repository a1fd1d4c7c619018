"""SLaK dynamic sparse training as a Trainer callback: plan kept, zeros exact, state clean, resume exact, bf16."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from uniperception.backbones import SLaK
from uniperception.errors import InvalidInputError, TrainingError
from uniperception.training import TrainConfig, Trainer
from uniperception.training.sparse import (
    SPARSE_PRESETS,
    DynamicSparsity,
    erk_densities,
    prune_rate_at,
    snip_densities,
)

SMALL = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), "kernel_size": (13, 11, 9, 7, 3), "width_factor": 1.0}


class Digits(Dataset):
    """scikit-learn's 8×8 digits (classes 0–3) as 3×8×8 uint8 arrays."""

    def __init__(self, split: str, n: int = 400, classes: int = 4):
        from sklearn.datasets import load_digits

        d = load_digits()
        keep = d.target < classes
        x, y = d.images[keep], d.target[keep]
        x, y = (x[:n], y[:n]) if split == "train" else (x[n : n + 200], y[n : n + 200])
        self.x = (np.repeat(x[:, None], 3, 1) * 16).clip(0, 255).astype(np.uint8)
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def collate(samples) -> tuple[Tensor, Tensor]:
    """8×8 digits → 32×32 normalised tensors (SLaK needs at least 32 px)."""
    x = torch.from_numpy(np.stack([s[0] for s in samples])).float() / 255.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return (x - 0.3) / 0.3, torch.tensor([s[1] for s in samples])


class TinySLaK(nn.Module):
    """A small SLaK classifier with the ``loss``/``metrics`` methods the Trainer uses."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.net = SLaK(num_classes=4, **{**SMALL, **kwargs})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target)

    def metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        return {"acc1": float((logits.argmax(-1) == target).float().mean())}


def _trainer(model: nn.Module, out, cb: DynamicSparsity, n: int = 160, **cfg) -> Trainer:
    config = TrainConfig(**{"epochs": 3, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5, "out_dir": str(out),
                            "progress": False, "weight_decay": 0.05, **cfg})
    return Trainer(model, Digits("train", n=n), Digits("val", n=n), config, collate_fn=collate, callbacks=[cb])


def _fake_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, epochs: int = 1):
    return SimpleNamespace(model=model, optimizer=optimizer, step=0, epoch=0, ema=None, train_data=data,
                           collate_fn=collate, loss_fn=F.cross_entropy, world_size=1,
                           config=TrainConfig(epochs=epochs, batch_size=32, progress=False))


def _check_masked_state(cb: DynamicSparsity, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    params = dict(model.named_parameters())
    for name, mask in cb.masks.items():
        p = params[name]
        assert torch.all(p[~mask] == 0), f"{name}: a pruned weight is not exactly zero"
        assert int(mask.sum()) == cb.planned[name], f"{name}: {int(mask.sum())} kept, planned {cb.planned[name]}"
        for key, v in opt.state[p].items():
            if isinstance(v, Tensor) and v.shape == p.shape:
                assert torch.all(v[~mask] == 0), f"{name}: optimiser {key} not zero at pruned positions"


# --------------------------------------------------------------------------------------------- unit level
@pytest.mark.parametrize("growth,opt_name", [("random", "adamw"), ("gradient", "sgd")])
def test_plan_kept_zeros_exact_state_clean_over_many_rounds(growth, opt_name):
    model = SLaK(num_classes=4, **SMALL)
    data = Digits("train", n=96)
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    cb = DynamicSparsity(sparsity=0.4, init="snip", update_frequency=2, prune_rate=0.5, growth=growth, seed=1)
    tr = _fake_trainer(model, opt, data, epochs=10)
    tr.loss_fn = F.cross_entropy
    cb.on_train_start(tr)
    assert cb.masks and cb.total_steps == 30
    x, y = collate([data[i] for i in range(96)])
    params = dict(model.named_parameters())
    for step in range(1, 25):
        before = {n: m.clone() for n, m in cb.masks.items()}
        loss = F.cross_entropy(model(x[(step % 3) * 32:(step % 3 + 1) * 32]), y[(step % 3) * 32:(step % 3 + 1) * 32])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tr.step = step
        cb.after_optimizer_step(tr)
        _check_masked_state(cb, model, opt)
        if step % 2 == 0:
            changed = sum(int((before[n] != cb.masks[n]).sum()) for n in cb.masks)
            assert changed > 0, "prune-and-grow moved nothing"
            for n, grown in cb.last_grown.items():  # newly grown and pruned-then-regrown: all start at zero
                assert torch.all(params[n].detach().flatten()[grown] == 0)
                for v in opt.state[params[n]].values():
                    if isinstance(v, Tensor) and v.shape == params[n].shape:
                        assert torch.all(v.flatten()[grown] == 0)
    assert cb.rounds == 12
    report = cb.density_report()
    for r in report:
        assert r.mask == r.planned and r.realised <= r.planned
    total = sum(params[n].numel() for n in params if params[n].ndim in (2, 4))
    kept = sum(cb.planned.get(n, params[n].numel()) for n in params if params[n].ndim in (2, 4))
    assert abs(kept / total - 0.6) < 0.012  # dense-dropped tensors (>= 0.99) may add up to 1 %


def test_snip_ratios_follow_the_spec_and_positions_are_random():
    model = SLaK(num_classes=4, **SMALL)
    cb = DynamicSparsity(init="snip", seed=0)
    tr = _fake_trainer(model, torch.optim.AdamW(model.parameters()), Digits("train", n=64))
    cb.on_train_start(tr)
    # the stem, downsampling convs and head of a layer-scaled SLaK get large scores: dense, no mask (spec §9.2)
    assert "downsample_layers.0.0.weight" not in cb.masks and "head.weight" not in cb.masks
    assert any(".large_kernel.LoRA1." in n for n in cb.masks)
    # positions are uniformly random, not the SNIP top scores: ~density of every row is kept
    name = max(cb.masks, key=lambda n: cb.masks[n].numel())
    rows = cb.masks[name].flatten(1).float().mean(1)
    assert rows.std() < 0.2 and abs(rows.mean() - cb.densities[name]) < 0.01
    # the global threshold: exactly the top scores are kept
    s = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 0.5, 0.1, 20.0])}
    d = snip_densities(s, 0.5)
    assert d == {"a": 0.25, "b": 0.5}


def test_erk_at_40_percent_leaves_every_depthwise_kernel_of_slak_t_dense():
    with torch.device("meta"):
        model = SLaK(num_classes=1000)  # SLaK-T defaults: width 1.3, kernels 51/49/47/13 × 5
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.ndim in (2, 4)}
    d = erk_densities(shapes, 0.6)
    dw = [n for n in shapes if ".large_kernel." in n]
    assert len(dw) == 54 and all(d[n] == 1.0 for n in dw)
    masked = [n for n in shapes if d[n] < 0.99]
    assert len(shapes) == 95 and len(masked) == 28  # spec §9.2: 67 dense, 28 masked
    assert all(".pwconv" in n or n.startswith("downsample_layers.") or n == "head.weight" for n in masked)
    assert d["stages.2.0.pwconv1.weight"] == pytest.approx(0.79, abs=0.01)
    assert d["stages.3.0.pwconv1.weight"] == pytest.approx(0.40, abs=0.01)
    assert d["head.weight"] == pytest.approx(0.64, abs=0.01)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(d[n] * math.prod(s) for n, s in shapes.items()) / total == pytest.approx(0.6, rel=1e-9)


def test_schedule_presets_and_validation():
    assert prune_rate_at(0, 100, 0.5) == pytest.approx(0.5)
    assert prune_rate_at(50, 100, 0.5) == pytest.approx(0.2525)
    assert prune_rate_at(100, 100, 0.5) == pytest.approx(0.005) == prune_rate_at(500, 100, 0.5)
    t = DynamicSparsity.preset("slak_t")
    assert (t.update_frequency, t.prune_rate, t.sparsity, t.init, t.growth) == (2000, 0.5, 0.4, "snip", "random")
    s = DynamicSparsity.preset("slak_s", growth="gradient")
    assert (s.update_frequency, s.prune_rate, s.growth) == (100, 0.3, "gradient")
    assert set(SPARSE_PRESETS) == {"slak_t", "slak_s", "slak_b"}
    for bad in ({"sparsity": 1.0}, {"init": "snap"}, {"growth": "momentum"}, {"update_frequency": 0},
                {"prune_rate": 0.001}):
        with pytest.raises(InvalidInputError):
            DynamicSparsity(**bad)
    with pytest.raises(InvalidInputError, match="preset"):
        DynamicSparsity.preset("slak_x")


def test_selection_only_large_kernels_patterns_and_export():
    model = SLaK(num_classes=4, **SMALL)
    opt = torch.optim.AdamW(model.parameters())
    cb = DynamicSparsity(init="uniform", only_large_kernels=True)
    cb.on_train_start(_fake_trainer(model, opt, Digits("train", n=32)))
    assert cb.masks and all("large_kernel.LoRA" in n for n in cb.masks) and len(cb.masks) == 8
    cb2 = DynamicSparsity(init="uniform", include=["*pwconv1.weight"], exclude=["stages.3.*"])
    cb2.on_train_start(_fake_trainer(model, opt, Digits("train", n=32)))
    assert sorted(cb2.masks) == [f"stages.{i}.0.pwconv1.weight" for i in range(3)]
    cb3 = DynamicSparsity(init="uniform", include=lambda n, p: n == "head.weight")
    cb3.on_train_start(_fake_trainer(model, opt, Digits("train", n=32)))
    assert list(cb3.masks) == ["head.weight"]
    # export: a fresh dense copy loaded with other weights is made exactly sparse
    dense = SLaK(num_classes=4, **SMALL)
    cb.apply_masks_permanently(dense)
    for r in cb.density_report(dense):
        assert r.realised <= r.planned == pytest.approx(0.6, abs=1 / r.numel)
    # "resume" init rebuilds masks from the zeros of a sparse model (official files carry no masks)
    cb4 = DynamicSparsity(init="resume")
    cb4.on_train_start(_fake_trainer(dense, torch.optim.AdamW(dense.parameters()), Digits("train", n=32)))
    assert set(cb4.masks) == set(cb.masks)
    assert all(torch.equal(cb4.masks[n], dict(dense.named_parameters())[n] != 0) for n in cb4.masks)
    with pytest.raises(InvalidInputError, match="no parameter matches"):
        DynamicSparsity(include=["nothing*"]).on_train_start(_fake_trainer(model, opt, Digits("train", n=32)))


def test_state_dict_round_trip_is_compact_and_checked():
    model = SLaK(num_classes=4, **SMALL)
    cb = DynamicSparsity(init="uniform", seed=3)
    cb.on_train_start(_fake_trainer(model, torch.optim.AdamW(model.parameters()), Digits("train", n=32)))
    state = cb.state_dict()
    assert all(v.dtype == torch.uint8 and v.numel() <= math.ceil(cb.masks[n].numel() / 8)
               for n, v in state["masks"].items())
    other = DynamicSparsity()
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], cb.masks[n]) for n in cb.masks)
    assert torch.equal(other.generator.get_state(), cb.generator.get_state())
    wrong = SLaK(num_classes=4, **{**SMALL, "dims": (8, 16, 32, 64)})
    with pytest.raises(TrainingError, match="does not match"):
        other.on_train_start(_fake_trainer(wrong, torch.optim.AdamW(wrong.parameters()), Digits("train", n=32)))


# --------------------------------------------------------------------------------------------- through the Trainer
def _opt_state(t: Trainer) -> dict[str, dict[str, Tensor]]:
    names = {id(p): n for n, p in t.model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in t.optimizer.state.items()}


def test_resume_keeps_masks_and_optimizer_state_identical(tmp_path):
    def cb() -> DynamicSparsity:
        return DynamicSparsity(update_frequency=3, prune_rate=0.5, seed=0)

    straight, cb_a = TinySLaK(), cb()
    ta = _trainer(straight, tmp_path / "a", cb_a, ema_decay=0.9)
    ta.fit()
    interrupted, cb_b = TinySLaK(), cb()
    tb = _trainer(interrupted, tmp_path / "b", cb_b, ema_decay=0.9, max_steps=10)  # stops after epoch 2
    tb.fit()
    assert tb.epoch == 2 and cb_b.rounds == 3
    resumed, cb_c = TinySLaK(seed=123), cb()  # different init and masks: everything must come from the checkpoint
    tc = _trainer(resumed, tmp_path / "b", cb_c, ema_decay=0.9)
    tc.fit(resume=True)
    assert cb_a.rounds == cb_c.rounds == 5
    assert set(cb_a.masks) == set(cb_c.masks)
    assert all(torch.equal(cb_a.masks[n], cb_c.masks[n]) for n in cb_a.masks)
    a, c = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a), "resumed weights differ from the uninterrupted run"
    sa, sc = _opt_state(ta), _opt_state(tc)
    assert sa.keys() == sc.keys()
    assert all(torch.equal(sa[n][k], sc[n][k]) for n in sa for k in sa[n])
    ema = dict(ta.ema.module.named_parameters())
    for n, m in cb_a.masks.items():  # the EMA copy is sparse with the same pattern
        assert torch.all(ema[n][~m] == 0)


def test_bf16_autocast_keeps_sparsity(tmp_path):
    model, cb = TinySLaK(), DynamicSparsity(update_frequency=2, prune_rate=0.3, init="uniform", seed=0)
    t = _trainer(model, tmp_path, cb, amp="bf16", epochs=1, n=96)
    t.fit()
    assert t.step == 3 and cb.rounds == 1
    _check_masked_state(cb, model, t.optimizer)
    assert cb.overall_density() <= 0.6 + 1e-9


def test_short_sparse_run_learns_digits(tmp_path):
    model, cb = TinySLaK(), DynamicSparsity(update_frequency=10, prune_rate=0.5, seed=0)
    t = _trainer(model, tmp_path, cb, n=400, epochs=4, eval_every=4)
    history = t.fit()
    assert history[-1]["val_acc1"] >= 0.8, history  # 4 classes: chance is 0.25
    assert cb.rounds == 5
    assert cb.overall_density() <= 0.6 + 1e-9
    _check_masked_state(cb, model, t.optimizer)
