"""One training loop for every modality and head, from one CPU to ``torchrun`` DDP.

AdamW with decoupled weight decay (none on norms, biases, layer scales and GRN parameters), linear warm-up
then cosine decay per step, optional EMA of the weights (``torch.optim.swa_utils``), gradient clipping,
activation checkpointing, bfloat16 autocast, deterministic seeding. Checkpoints hold model, optimiser,
scheduler, EMA, RNG states and the large-kernel conv choices, are written atomically (temp file + rename)
and read back with ``torch.load(weights_only=True)``; ``resume=True`` continues a run exactly (bit-identical on
CPU with ``num_workers=0``). Metrics go to ``metrics.jsonl``; curves and a confusion matrix to PNG files.
Distributed data parallel runs under ``torchrun`` (gloo on CPU, nccl on GPU) with a ``DistributedSampler``;
only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..checkpoints import _fsync_dir, _release_frames
from ..errors import TrainingError
from ..ops import conv_impl_state, load_conv_impl_state
from .config import TrainConfig

__all__ = ["Callback", "Trainer", "param_groups", "seed_everything"]

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global RNG other libraries draw from
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices/kernels, none on 1-D parameters (norms, biases, scales, GRN)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("gamma", "beta", ".bias")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Callback:
    """Hooks into the loop (SLaK's dynamic sparsity plugs in here). All methods are optional."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def after_optimizer_step(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.array(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached), "kind": str(kind)},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file, fsync, rename: a crash or kill leaves the previous ``path`` intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (disk full) as a RuntimeError
        _release_frames(e)
        raise TrainingError(
            f"could not write checkpoint {path}: {e}. Is the disk full or the directory not writable? "
            "The previous checkpoint is unchanged."
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class Trainer:
    """Train ``model`` on ``train_data`` (see the module docstring).

    Args:
        model: maps a collated input batch to outputs.
        train_data / val_data: map-style datasets.
        config: a :class:`TrainConfig`.
        collate_fn: raw samples → ``(inputs, targets)`` (e.g. :class:`uniperception.training.AdapterCollate`).
        loss_fn / metrics_fn: ``(outputs, targets) -> loss`` / ``-> dict``; default ``model.loss`` / ``model.metrics``.
        callbacks: :class:`Callback` objects.
        labels: class names, for the confusion-matrix plot.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset | None,
        config: TrainConfig,
        collate_fn: Callable[[list[Any]], tuple[Any, Tensor]] | None = None,
        loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
        metrics_fn: Callable[[Any, Tensor], dict[str, float]] | None = None,
        callbacks: Sequence[Callback] = (),
        labels: Sequence[str] | None = None,
        val_collate_fn: Callable[[list[Any]], tuple[Any, Tensor]] | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.train_data, self.val_data = train_data, val_data
        self.collate_fn = collate_fn
        self.val_collate_fn = val_collate_fn or collate_fn
        self.loss_fn = loss_fn or getattr(model, "loss", None)
        self.metrics_fn = metrics_fn or getattr(model, "metrics", None)
        if self.loss_fn is None:
            raise TrainingError("no loss: pass loss_fn or give the model a .loss(outputs, targets) method")
        self.callbacks = list(callbacks)
        self.labels = list(labels) if labels else None
        self.out_dir = Path(config.out_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # completed epochs
        self.step = 0  # optimiser steps
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        self._ddp: nn.Module | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def _check_out_dir(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".write_test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise TrainingError(f"output directory {self.out_dir} is not writable: {e}") from e

    def _check_disk_space(self) -> None:
        """Fail before the first step when the output disk cannot hold two checkpoints (model, AdamW, EMA)."""
        import shutil

        copies = 3 + (1 if self.ema is not None else 0)  # weights, two AdamW moments, EMA weights
        need = 2 * copies * _state_bytes(self.model)  # the new file is written beside the old one
        try:
            free = shutil.disk_usage(self.out_dir).free
        except OSError:
            return
        if free < need:
            raise TrainingError(
                f"not enough disk space in {self.out_dir}: {free / 2**20:.1f} MiB free, a checkpoint needs about "
                f"{need / 2 / 2**20:.1f} MiB (and as much again while it is replaced); free some space or "
                "choose another out_dir"
            )

    def _init_distributed(self) -> torch.device:
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if torch.cuda.is_available() and self.world_size > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return next(self.model.parameters()).device

    def _loader(self, data: Dataset, epoch: int, train: bool) -> DataLoader:
        cfg = self.config
        sampler = DistributedSampler(
            data, num_replicas=self.world_size, rank=self.rank, shuffle=train, seed=cfg.seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
        return DataLoader(
            data, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.num_workers,
            collate_fn=self.collate_fn if train else self.val_collate_fn, generator=gen,
            persistent_workers=False,
        )

    def _lr_lambda(self, steps_per_epoch: int) -> Callable[[int], float]:
        cfg = self.config
        total = max(1, cfg.epochs * steps_per_epoch)
        warm = int(cfg.warmup_epochs * steps_per_epoch)
        floor = cfg.min_lr / cfg.lr

        def f(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        return f

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, resume: bool | str | os.PathLike[str] = False) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` (continuing from a checkpoint when ``resume``); returns the metric history."""
        cfg = self.config
        if self.is_main:
            self._check_out_dir()
        device = self._init_distributed()
        if cfg.keep_freed_memory and device.type == "cpu":
            from .._alloc import keep_freed_memory

            keep_freed_memory()
        seed_everything(cfg.seed)
        if cfg.grad_checkpointing:
            target = getattr(self.model, "backbone", self.model)
            if hasattr(target, "set_grad_checkpointing"):
                target.set_grad_checkpointing(True)
        self.model.to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        steps_per_epoch = math.ceil(len(self._loader(self.train_data, 0, True)) or 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda(steps_per_epoch))
        if cfg.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )
        if resume:
            path = Path(resume) if not isinstance(resume, bool) else self.out_dir / "last.pt"
            if path.is_file():
                self.load_checkpoint(path)
            elif not isinstance(resume, bool):
                raise TrainingError(f"resume checkpoint not found: {path}")
            else:
                logger.info("no checkpoint at %s: starting from scratch", path)
        if self.is_main:
            self._check_disk_space()
            # the log holds exactly the epochs the weights have seen: a killed run's epochs after its last
            # checkpoint are dropped (they are trained again), and a fresh run starts a fresh log
            with open(self.out_dir / "metrics.jsonl", "w") as fh:
                fh.writelines(json.dumps(m) + "\n" for m in self.history)
        self._ddp = (
            nn.parallel.DistributedDataParallel(self.model) if self.world_size > 1 and dist.is_initialized() else None
        )
        for cb in self.callbacks:
            cb.on_train_start(self)
        net = self._ddp or self.model
        while self.epoch < cfg.epochs:
            if self._train_epoch(net, device):
                break
        if self.is_main:
            self._plots()
        return self.history

    def _train_epoch(self, net: nn.Module, device: torch.device) -> bool:
        cfg = self.config
        epoch = self.epoch
        net.train()
        loader = self._loader(self.train_data, epoch, True)
        t0 = time.perf_counter()
        total, count = 0.0, 0
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for i, (inputs, targets) in enumerate(loader):
            inputs, targets = _to(inputs, device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                outputs = net(inputs)
                loss = self.loss_fn(outputs.float() if isinstance(outputs, Tensor) else outputs, targets)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {self.step + 1} (batch {i}); "
                    "no weights were written. Lower the learning rate, check the inputs for NaN/Inf, or "
                    "enable grad_clip."
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads and not torch.isfinite(nn.utils.get_total_norm(grads)):  # one fused pass over the gradients
                bad = [n for n, p in self.model.named_parameters()
                       if p.grad is not None and not torch.isfinite(p.grad).all()]
                raise TrainingError(
                    f"gradients became non-finite at epoch {epoch + 1}, step {self.step + 1} (batch {i}) in "
                    f"{', '.join(bad[:3]) or 'several parameters'}{' …' if len(bad) > 3 else ''} although the loss "
                    f"is {loss.item()}; no weights were updated or written. Lower the learning rate, check the "
                    "loss for sqrt/log of 0, or enable grad_clip."
                )
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            for cb in self.callbacks:
                cb.after_optimizer_step(self)
            total += loss.item() * len(targets)
            count += len(targets)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
        if bar is not None:
            bar.close()
        self.epoch += 1
        stopped = cfg.max_steps is not None and self.step >= cfg.max_steps
        metrics: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step, "train_loss": _reduce_mean(total, count),
            "lr": self.scheduler.get_last_lr()[0], "epoch_time_s": time.perf_counter() - t0,
        }
        if self.val_data is not None and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs or stopped):
            metrics.update({f"val_{k}": v for k, v in self.evaluate(self.val_data).items()})
        self.history.append(metrics)
        for cb in self.callbacks:
            cb.on_epoch_end(self, metrics)
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            logger.info("epoch %d: %s", self.epoch, metrics)
            if self.epoch % cfg.save_every == 0 or self.epoch == cfg.epochs or stopped:
                self.save_checkpoint()
        return stopped

    @torch.no_grad()
    def evaluate(self, data: Dataset, model: nn.Module | None = None) -> dict[str, float]:
        """Loss and metrics over ``data`` (the EMA weights when EMA is on), reduced across processes."""
        net = model or (self.ema.module if self.ema is not None else self.model)
        was = net.training
        net.eval()
        device = next(net.parameters()).device
        outs, tgts = [], []
        for inputs, targets in self._loader(data, 0, False):
            outs.append(net(_to(inputs, device)).float().cpu())
            tgts.append(targets.cpu())
        net.train(was)
        if not outs:
            return {}
        logits, target = torch.cat(outs), torch.cat(tgts)
        self._last_eval = (logits, target)
        result = {"loss": float(self.loss_fn(logits, target))}
        if self.metrics_fn is not None:
            result.update(self.metrics_fn(logits, target))
        if self.world_size > 1 and dist.is_initialized():
            keys = sorted(result)
            t = torch.tensor([result[k] * len(target) for k in keys] + [len(target)], dtype=torch.float64)
            dist.all_reduce(t)
            result = {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}
        return result

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the full training state atomically (``last.pt`` and ``epoch{N}.pt``); never non-finite weights."""
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(
                f"weights became non-finite by epoch {self.epoch}, step {self.step} ({', '.join(bad[:3])}); "
                "the checkpoint was not written and the previous one is kept"
            )
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "rng": _rng_state(),
            "conv_impls": conv_impl_state(self.model),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "history": json.dumps(self.history),
            "config": json.dumps(self.config.to_dict()),
        }
        target = Path(path) if path else self.out_dir / f"epoch{self.epoch:04d}.pt"
        _atomic_torch_save(state, target)
        if path is None:
            _atomic_torch_save(state, self.out_dir / "last.pt")
            kept = sorted(self.out_dir.glob("epoch*.pt"))
            for old in kept[: max(0, len(kept) - self.config.keep_last)]:
                old.unlink(missing_ok=True)
        return target

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore a state written by :meth:`save_checkpoint` (checkpoints are taken at epoch ends)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrainingError(f"cannot read training checkpoint {path} (corrupt or truncated?): {e}") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not a uniperception training checkpoint")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        load_conv_impl_state(self.model, state.get("conv_impls", {}))
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", []), strict=False):
            cb.load_state_dict(cb_state)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = json.loads(state.get("history", "[]"))
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    # ------------------------------------------------------------------------------------------ plots
    def _plots(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plotting is optional
            return
        if self.history:
            fig, ax = plt.subplots(1, 2, figsize=(10, 4))
            ep = [h["epoch"] for h in self.history]
            ax[0].plot(ep, [h["train_loss"] for h in self.history], label="train")
            if any("val_loss" in h for h in self.history):
                ax[0].plot([h["epoch"] for h in self.history if "val_loss" in h],
                           [h["val_loss"] for h in self.history if "val_loss" in h], label="val")
            ax[0].set_xlabel("epoch"); ax[0].set_ylabel("loss"); ax[0].legend()  # noqa: E702
            accs = [(h["epoch"], h["val_acc1"]) for h in self.history if "val_acc1" in h]
            if accs:
                ax[1].plot(*zip(*accs, strict=True), marker="o")
                ax[1].set_xlabel("epoch"); ax[1].set_ylabel("val top-1 accuracy")  # noqa: E702
            fig.tight_layout()
            fig.savefig(self.out_dir / "curves.png", dpi=100)
            plt.close(fig)
        last = getattr(self, "_last_eval", None)
        if last is not None and self.labels and last[1].dim() == 1:
            logits, target = last
            k = len(self.labels)
            cm = torch.zeros(k, k, dtype=torch.long)
            for t, p in zip(target.tolist(), logits.argmax(-1).tolist(), strict=True):
                cm[t, p] += 1
            fig, ax = plt.subplots(figsize=(1 + 0.5 * k, 1 + 0.5 * k))
            ax.imshow(cm, cmap="Blues")
            ax.set_xticks(range(k), self.labels, rotation=90)
            ax.set_yticks(range(k), self.labels)
            ax.set_xlabel("predicted"); ax.set_ylabel("true")  # noqa: E702
            for (r, c), v in np.ndenumerate(cm.numpy()):
                ax.text(c, r, str(v), ha="center", va="center", fontsize=7)
            fig.tight_layout()
            fig.savefig(self.out_dir / "confusion.png", dpi=100)
            plt.close(fig)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _reduce_mean(total: float, count: int) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([total, float(count)], dtype=torch.float64)
        dist.all_reduce(t)
        total, count = t[0].item(), int(t[1].item())
    return total / max(count, 1)
