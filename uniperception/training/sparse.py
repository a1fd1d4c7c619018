"""SLaK's dynamic sparse training as a :class:`~uniperception.training.Callback` of the one training loop.

The recipe (SLaK spec §9): a fixed global sparsity (0.4) over the masked weights, a per-tensor density
chosen at the start, masks re-applied after every optimiser step, and every ``update_frequency`` optimiser
steps a prune-and-grow round per tensor (magnitude prune of ``⌈p·n⌉`` active weights, regrow as many at
masked positions), with the prune rate ``p`` on a cosine from ``prune_rate`` down to 0.005 over the run.

Initial densities (``init``):

* ``"snip"`` (the official default, every SLaK result): one training batch through a copy of the model, score
  ``|w · ∂L/∂w|``, one global threshold keeping ``density · total`` scores; each tensor's density is the
  fraction of its scores above it. SNIP only sets the *ratios*: the positions are drawn uniformly at random.
* ``"erk"``: Erdős–Rényi-kernel, density ∝ (sum of dims)/(product of dims). **At sparsity 0.4 on SLaK-T this
  leaves every depthwise kernel dense** and puts the sparsity in the MLPs — it is not the SLaK recipe.
* ``"uniform"``: the same density everywhere. ``"resume"``: mask = (weight ≠ 0), to continue from a sparse
  checkpoint that carries no masks (e.g. an official one).

Tensors whose planned density is ≥ ``dense_threshold`` (0.99) get no mask (official behaviour).

Differences from the official ``sparse_core.Masking``, on purpose (spec §9.3–9.5, §14):

* masks are in :meth:`DynamicSparsity.state_dict`, so they are saved in every training checkpoint and
  survive ``fit(resume=True)``; the ``update_frequency`` counter is the trainer's global step (the official
  one restarts at 0 on resume);
* masks are applied after every optimiser step also under bf16 autocast (the official AMP path never calls
  ``mask.step()`` and silently densifies);
* every optimiser-state tensor shaped like a masked weight (AdamW ``exp_avg``/``exp_avg_sq``, SGD
  ``momentum_buffer``, …) is zeroed at the masked positions after every step, so regrown weights do not
  inherit stale moments;
* regrown weights start at exactly zero, also those pruned and regrown in the same round (the official code
  lets those keep their old value);
* exact counts: initial positions are drawn without replacement (not Bernoulli) and random growth regrows
  exactly as many weights as were pruned, so every tensor holds exactly its planned number of non-zeros;
* all randomness comes from the callback's own ``torch.Generator`` (saved in checkpoints), never the global
  RNG; the SNIP pass runs on a deep copy under a forked RNG, so enabling sparsity does not shift the data
  order or augmentation of the run;
* the EMA copy of the trainer (when on) is masked with the same masks after every step (official
  ``ModelEma`` with masks).

Gradients stay dense (as in the official code): masked weights still receive gradients, which gradient
growth uses. Momentum growth is not offered: with the moments of masked weights zeroed every step it would
reduce to gradient growth.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InvalidInputError, TrainingError
from .engine import Callback

if TYPE_CHECKING:
    from .engine import Trainer

__all__ = [
    "SPARSE_PRESETS",
    "DynamicSparsity",
    "LayerDensity",
    "erk_densities",
    "prune_rate_at",
    "snip_densities",
    "uniform_densities",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
INIT_MODES = ("snip", "erk", "uniform", "resume")
GROWTH_MODES = ("random", "gradient")

#: the official SLaK schedules (README commands, spec §10.1): sparsity 0.4, SNIP init, magnitude prune, random
#: growth; SLaK-T prunes-and-grows every 2000 optimiser steps at rate 0.5, SLaK-S/B every 100 at 0.3
SPARSE_PRESETS: dict[str, dict[str, Any]] = {
    "slak_t": {"sparsity": 0.4, "init": "snip", "update_frequency": 2000, "prune_rate": 0.5, "growth": "random"},
    "slak_s": {"sparsity": 0.4, "init": "snip", "update_frequency": 100, "prune_rate": 0.3, "growth": "random"},
    "slak_b": {"sparsity": 0.4, "init": "snip", "update_frequency": 100, "prune_rate": 0.3, "growth": "random"},
}

Selector = Callable[[str, Tensor], bool]


# --------------------------------------------------------------------------------------------- planning
def prune_rate_at(step: int, total_steps: int, prune_rate: float, final_rate: float = 0.005) -> float:
    """The official cosine prune-rate schedule: ``final + (p0 − final)(1 + cos(π t/T))/2``, held at ``final`` after T."""
    t = min(max(step, 0), total_steps) / max(1, total_steps)
    return final_rate + (prune_rate - final_rate) * 0.5 * (1.0 + math.cos(math.pi * t))


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """The same density for every tensor."""
    return {name: float(density) for name in shapes}


def erk_densities(
    shapes: Mapping[str, Sequence[int]], density: float, power_scale: float = 1.0
) -> dict[str, float]:
    """Erdős–Rényi-kernel densities (official ``ERK`` init): ``ε · (Σ dims / Π dims)^power``, with one ε solved so
    that the masked tensors hold ``density`` of their weights in total; a tensor whose density would exceed 1 is
    made dense and ε is re-solved without it."""
    dense: set[str] = set()
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / numel[n]) ** power_scale for n, s in shapes.items()}
    while True:
        rhs, divisor = 0.0, 0.0
        for n in shapes:
            if n in dense:
                rhs -= numel[n] * (1.0 - density)
            else:
                rhs += numel[n] * density
                divisor += raw[n] * numel[n]
        if divisor == 0.0:
            break
        eps = rhs / divisor
        live = [n for n in shapes if n not in dense]
        max_raw = max(raw[n] for n in live)
        if max_raw * eps > 1.0:
            dense.update(n for n in live if raw[n] == max_raw)
        else:
            break
    return {n: 1.0 if n in dense else min(1.0, eps * raw[n]) for n in shapes}


def snip_densities(scores: Mapping[str, Tensor], density: float) -> dict[str, float]:
    """SNIP layer-wise densities (official ``snip`` init): keep the ``⌊density · total⌋`` largest scores globally;
    a tensor's density is the fraction of its scores strictly above the last kept score."""
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores.values()])
    keep = max(1, int(density * flat.numel()))
    threshold = torch.topk(flat, keep, sorted=True).values[-1]
    return {n: float((s.detach().float().cpu() > threshold).float().mean()) for n, s in scores.items()}


@dataclasses.dataclass(frozen=True)
class LayerDensity:
    """One row of :meth:`DynamicSparsity.density_report`."""

    name: str
    shape: tuple[int, ...]
    numel: int
    planned: float  # planned density (non-zeros / numel)
    mask: float  # density of the mask
    realised: float  # fraction of non-zero weights in the model tensor


# --------------------------------------------------------------------------------------------- callback
class DynamicSparsity(Callback):
    """SLaK dynamic sparse training (see the module docstring).

    Args:
        sparsity: global fraction of zeros over the masked tensors (0.4 in SLaK).
        init: ``"snip"`` (default, official), ``"erk"``, ``"uniform"`` or ``"resume"``.
        update_frequency: prune-and-grow every this many optimiser steps (``-u``; 2000 for SLaK-T, 100 for S/B).
        prune_rate: initial prune rate (0.5 for SLaK-T, 0.3 for S/B), annealed on a cosine to ``final_prune_rate``.
        final_prune_rate: the rate at the end of the run (0.005).
        growth: ``"random"`` (official README setting) or ``"gradient"`` (largest ``|∂L/∂w|`` of the step).
        include: which parameters get a mask: ``None`` (official: every 2-D and 4-D parameter), a predicate
            ``(name, param) -> bool``, or shell-style name patterns (``"*pwconv*"``).
        exclude: shell-style name patterns never masked.
        only_large_kernels: mask only the rectangular large kernels (names containing ``large_kernel.LoRA``),
            the official ``--only-L``.
        dense_threshold: tensors planned at this density or more get no mask (0.99, official).
        total_steps: the ``T`` of the prune-rate cosine; default ``epochs × steps per epoch`` of the trainer.
        fix: static sparse training (masks never change after initialisation; ``--fix``).
        seed: seed of the callback's generator (default: the trainer's ``config.seed``).
        snip_batch: an ``(inputs, targets)`` batch for SNIP (default: the first batch of a shuffled pass over
            the trainer's training data, drawn with the callback's generator).
        loss_fn: loss for SNIP (default: the trainer's).
    """

    def __init__(
        self,
        sparsity: float = 0.4,
        init: str = "snip",
        update_frequency: int = 2000,
        prune_rate: float = 0.5,
        final_prune_rate: float = 0.005,
        growth: str = "random",
        include: Selector | Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        only_large_kernels: bool = False,
        dense_threshold: float = 0.99,
        total_steps: int | None = None,
        fix: bool = False,
        seed: int | None = None,
        snip_batch: tuple[Any, Tensor] | None = None,
        loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise InvalidInputError(f"sparsity must be in [0, 1), got {sparsity}")
        if init not in INIT_MODES:
            raise InvalidInputError(f"init must be one of {INIT_MODES}, got {init!r}")
        if growth not in GROWTH_MODES:
            raise InvalidInputError(f"growth must be one of {GROWTH_MODES}, got {growth!r}")
        if update_frequency < 1:
            raise InvalidInputError(f"update_frequency must be >= 1 optimiser step, got {update_frequency}")
        if not 0.0 <= final_prune_rate <= prune_rate <= 1.0:
            raise InvalidInputError(
                f"need 0 <= final_prune_rate <= prune_rate <= 1, got {final_prune_rate} and {prune_rate}"
            )
        if isinstance(include, str):
            include = [include]
        self.sparsity, self.init, self.growth = float(sparsity), init, growth
        self.update_frequency, self.prune_rate, self.final_prune_rate = int(update_frequency), prune_rate, final_prune_rate
        self.include, self.exclude, self.only_large_kernels = include, tuple(exclude), only_large_kernels
        self.dense_threshold, self.total_steps, self.fix, self.seed = dense_threshold, total_steps, fix, seed
        self.snip_batch, self.loss_fn = snip_batch, loss_fn
        #: parameter name → boolean mask (True = weight kept)
        self.masks: dict[str, Tensor] = {}
        #: parameter name → planned number of non-zeros / planned density
        self.planned: dict[str, int] = {}
        self.densities: dict[str, float] = {}
        #: prune-and-grow rounds done, and per-round statistics (step, prune rate, weights moved)
        self.rounds = 0
        self.history: list[dict[str, float]] = []
        #: parameter name → flat indices regrown in the last round (for inspection and tests)
        self.last_grown: dict[str, Tensor] = {}
        self.generator = torch.Generator()
        self._generator_seeded = False
        self._model: nn.Module | None = None
        self._warned_no_grad = False

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DynamicSparsity:
        """The official schedule of ``"slak_t"``, ``"slak_s"`` or ``"slak_b"`` (see :data:`SPARSE_PRESETS`)."""
        if name not in SPARSE_PRESETS:
            raise InvalidInputError(f"no sparse preset {name!r}; choose from {sorted(SPARSE_PRESETS)}")
        return cls(**{**SPARSE_PRESETS[name], **overrides})

    # ----------------------------------------------------------------------------------------- selection
    def selects(self, name: str, param: Tensor) -> bool:
        """Whether parameter ``name`` is a candidate for a mask."""
        if not param.requires_grad or any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        if self.only_large_kernels and "large_kernel.LoRA" not in name:
            return False
        if self.include is None:
            return param.ndim in (2, 4)
        if callable(self.include):
            return bool(self.include(name, param))
        return any(fnmatch.fnmatchcase(name, p) for p in self.include)

    # ----------------------------------------------------------------------------------------- callback hooks
    def on_train_start(self, trainer: Trainer) -> None:
        """Create the masks (or re-attach those restored from a checkpoint) and sparsify the model."""
        model = trainer.model
        self._model = model
        params = dict(model.named_parameters())
        if not self._generator_seeded:
            seed = self.seed if self.seed is not None else int(getattr(trainer.config, "seed", 0))
            self.generator.manual_seed(seed + 0x5EED)
            self._generator_seeded = True
        if self.total_steps is None:
            self.total_steps = _total_steps(trainer)
        if self.masks:  # restored by load_state_dict (resume)
            for name, mask in self.masks.items():
                if name not in params or tuple(params[name].shape) != tuple(mask.shape):
                    raise TrainingError(
                        f"sparse mask {name!r} {tuple(mask.shape)} does not match the model "
                        f"({tuple(params[name].shape) if name in params else 'no such parameter'})"
                    )
                self.masks[name] = mask.to(params[name].device)
            logger.info("dynamic sparsity: %d masks restored (round %d)", len(self.masks), self.rounds)
        else:
            self._init_masks(trainer, params)
        self._broadcast_masks()
        self.apply_masks(trainer)

    def after_optimizer_step(self, trainer: Trainer) -> None:
        """Re-apply the masks; every ``update_frequency`` steps, prune and grow first."""
        if not self.masks:
            return
        step = int(trainer.step)
        if not self.fix and step > 0 and step % self.update_frequency == 0:
            self.apply_masks(trainer, zero_state=False)  # magnitudes of the weights the mask keeps
            self.prune_and_grow(trainer, prune_rate_at(step, self.total_steps or step, self.prune_rate,
                                                       self.final_prune_rate))
        self.apply_masks(trainer)

    # ----------------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def _init_masks(self, trainer: Trainer, params: dict[str, nn.Parameter]) -> None:
        names = [n for n, p in params.items() if self.selects(n, p)]
        if not names:
            raise InvalidInputError("dynamic sparsity: no parameter matches the mask selection (include/exclude)")
        density = 1.0 - self.sparsity
        shapes = {n: tuple(params[n].shape) for n in names}
        if self.init == "resume":
            densities = {n: float((params[n] != 0).float().mean()) for n in names}
        elif self.init == "uniform":
            densities = uniform_densities(shapes, density)
        elif self.init == "erk":
            densities = erk_densities(shapes, density)
        else:
            densities = snip_densities(self._snip_scores(trainer, names), density)
        for n in names:
            numel = params[n].numel()
            d = densities[n]
            if d >= self.dense_threshold:
                continue
            if self.init == "resume":
                mask = params[n] != 0
            else:
                keep = round(d * numel)
                flat = torch.zeros(numel, dtype=torch.bool)
                flat[torch.randperm(numel, generator=self.generator)[:keep]] = True
                mask = flat.view(params[n].shape).to(params[n].device)
            self.masks[n] = mask
            self.planned[n] = int(mask.sum())
            self.densities[n] = d
            if self.planned[n] == 0:
                logger.warning("dynamic sparsity: %s is planned with no non-zero weight", n)
        total = sum(params[n].numel() for n in names)
        kept = sum(self.planned.get(n, params[n].numel()) for n in names)
        logger.info(
            "dynamic sparsity (%s): %d of %d candidate tensors masked, density %.4f over the candidates "
            "(target %.4f)", self.init, len(self.masks), len(names), kept / total, density,
        )

    def _snip_scores(self, trainer: Trainer, names: list[str]) -> dict[str, Tensor]:
        """``|w · ∂L/∂w|`` from one training batch through a deep copy of the model (official SNIP)."""
        loss_fn = self.loss_fn or getattr(trainer, "loss_fn", None)
        if loss_fn is None:
            raise TrainingError("SNIP needs a loss: pass loss_fn= or use it through a Trainer")
        py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - restored below
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                inputs, targets = self.snip_batch if self.snip_batch is not None else self._first_batch(trainer)
                net = copy.deepcopy(trainer.model)
                net.train()
                net.zero_grad(set_to_none=True)
                device = next(net.parameters()).device
                outputs = net(_to(inputs, device))
                loss = loss_fn(outputs.float() if isinstance(outputs, Tensor) else outputs, targets.to(device))
                loss.backward()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002
        own = dict(net.named_parameters())
        scores = {}
        for n in names:
            p = own[n]
            scores[n] = (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
        return scores

    def _first_batch(self, trainer: Trainer) -> tuple[Any, Tensor]:
        data = getattr(trainer, "train_data", None)
        if data is None or len(data) == 0:
            raise TrainingError("SNIP needs a training batch: the trainer has no training data (pass snip_batch=)")
        bs = min(int(trainer.config.batch_size), len(data))
        idx = torch.randperm(len(data), generator=self.generator)[:bs].tolist()
        samples = [data[i] for i in idx]
        collate = getattr(trainer, "collate_fn", None) or torch.utils.data.default_collate
        return collate(samples)

    def _broadcast_masks(self) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for name in sorted(self.masks):
            m = self.masks[name].to(torch.uint8)
            dist.broadcast(m, src=0)
            self.masks[name] = m.bool()

    def _params(self, model: nn.Module) -> dict[str, Tensor]:
        """The masked parameters of ``model`` (``module.``-prefixed wrappers such as DDP or EMA copies accepted)."""
        own = dict(model.named_parameters())
        out: dict[str, Tensor] = {}
        for name in self.masks:
            for candidate in (name, f"module.{name}", name.removeprefix("module.")):
                if candidate in own:
                    out[name] = own[candidate]
                    break
            else:
                raise InvalidInputError(f"the model has no parameter {name!r} to mask")
        return out

    @torch.no_grad()
    def apply_masks(self, trainer: Trainer | None = None, zero_state: bool = True) -> None:
        """Zero the masked weights of the model (and of the trainer's EMA copy), and — with ``zero_state`` — every
        optimiser-state tensor shaped like a masked weight at the masked positions."""
        model = trainer.model if trainer is not None else self._model
        if model is None or not self.masks:
            return
        params = self._params(model)
        for name, p in params.items():
            p.masked_fill_(~self.masks[name], 0)
        optimizer = getattr(trainer, "optimizer", None)
        if zero_state and optimizer is not None:
            for name, p in params.items():
                for v in optimizer.state.get(p, {}).values():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        v.masked_fill_(~self.masks[name], 0)
        ema = getattr(trainer, "ema", None)
        if ema is not None:
            for name, p in self._params(ema.module).items():
                p.masked_fill_(~self.masks[name].to(p.device), 0)

    @torch.no_grad()
    def prune_and_grow(self, trainer: Trainer, prune_rate: float) -> None:
        """One round for every masked tensor: magnitude-prune ``⌈p · n⌉`` active weights, regrow as many among the
        masked positions (random or by gradient magnitude); grown weights and their optimiser state start at 0."""
        params = self._params(trainer.model)
        optimizer = getattr(trainer, "optimizer", None)
        moved = 0
        self.last_grown = {}
        for name, p in params.items():
            mask = self.masks[name].flatten()
            active = mask.nonzero().squeeze(1)
            r = math.ceil(prune_rate * active.numel())
            if r == 0:
                continue
            mags = p.detach().flatten()[active].float().abs()
            order = torch.sort(mags, stable=True).indices
            pruned = active[order[:r]]
            new = mask.clone()
            new[pruned] = False
            candidates = (~new).nonzero().squeeze(1)  # includes the just-pruned positions (official)
            grow = self._grow(name, p, candidates, r)
            new[grow] = True
            flat = p.data.view(-1) if p.is_contiguous() else None
            if flat is None:  # channels-last or other strides: go through a contiguous copy
                w = p.detach().flatten().clone()
                w[~new] = 0
                w[grow] = 0
                p.copy_(w.view_as(p))
            else:
                flat[~new] = 0
                flat[grow] = 0
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        vf = v.view(-1) if v.is_contiguous() else None
                        if vf is None:
                            tmp = v.flatten().clone()
                            tmp[~new] = 0
                            tmp[grow] = 0
                            v.copy_(tmp.view_as(v))
                        else:
                            vf[~new] = 0
                            vf[grow] = 0
            self.masks[name] = new.view_as(self.masks[name])
            self.last_grown[name] = grow.cpu()
            moved += r
        self.rounds += 1
        self.history.append({"step": float(trainer.step), "prune_rate": float(prune_rate), "moved": float(moved)})
        logger.info("dynamic sparsity round %d at step %d: prune rate %.4f, %d weights moved",
                    self.rounds, trainer.step, prune_rate, moved)

    def _grow(self, name: str, p: Tensor, candidates: Tensor, k: int) -> Tensor:
        k = min(k, candidates.numel())
        if self.growth == "gradient":
            if p.grad is not None:
                g = p.grad.detach().flatten()[candidates].float().abs()
                return candidates[torch.topk(g, k, sorted=False).indices]
            if not self._warned_no_grad:
                logger.warning("gradient growth: %s has no gradient this step; growing at random", name)
                self._warned_no_grad = True
        pick = torch.randperm(candidates.numel(), generator=self.generator)[:k]
        return candidates[pick.to(candidates.device)]

    # ----------------------------------------------------------------------------------------- export / report
    @torch.no_grad()
    def apply_masks_permanently(self, model: nn.Module | None = None) -> nn.Module:
        """Zero every masked weight of ``model`` (default: the trained model; an EMA copy or a DDP/EMA wrapper
        also works) so that it can be exported or saved without the callback; returns the model."""
        target = model if model is not None else self._model
        if target is None:
            raise InvalidInputError("no model: pass one, or call this after training started")
        for name, p in self._params(target).items():
            p.masked_fill_(~self.masks[name].to(p.device), 0)
        return target

    def density_report(self, model: nn.Module | None = None) -> list[LayerDensity]:
        """Planned vs realised density of every masked tensor (realised = non-zero weights of ``model``)."""
        target = model if model is not None else self._model
        if target is None:
            raise InvalidInputError("no model: pass one, or call this after training started")
        rows = []
        for name, p in self._params(target).items():
            m = self.masks[name]
            rows.append(LayerDensity(
                name=name, shape=tuple(p.shape), numel=p.numel(), planned=self.planned[name] / p.numel(),
                mask=int(m.sum()) / p.numel(), realised=int((p != 0).sum()) / p.numel(),
            ))
        return rows

    def overall_density(self, model: nn.Module | None = None) -> float:
        """Fraction of non-zero weights over all masked tensors."""
        rows = self.density_report(model)
        total = sum(r.numel for r in rows)
        return sum(r.realised * r.numel for r in rows) / max(1, total)

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed), plan, schedule position and RNG: everything a resume needs."""
        return {
            "version": STATE_VERSION,
            "masks": {n: _pack(m) for n, m in self.masks.items()},
            "shapes": {n: list(m.shape) for n, m in self.masks.items()},
            "planned": dict(self.planned),
            "densities": dict(self.densities),
            "rounds": self.rounds,
            "total_steps": -1 if self.total_steps is None else int(self.total_steps),
            "generator": self.generator.get_state(),
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (masks go to the parameters' device at :meth:`on_train_start`)."""
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise TrainingError(f"unsupported dynamic-sparsity state version {state.get('version')!r}")
        self.masks = {n: _unpack(v, state["shapes"][n]) for n, v in state["masks"].items()}
        self.planned = {n: int(v) for n, v in state["planned"].items()}
        self.densities = {n: float(v) for n, v in state["densities"].items()}
        self.rounds = int(state["rounds"])
        self.total_steps = None if int(state["total_steps"]) < 0 else int(state["total_steps"])
        self.generator.set_state(state["generator"])
        self._generator_seeded = True
        self.history = json.loads(state.get("history", "[]"))


# --------------------------------------------------------------------------------------------- helpers
def _total_steps(trainer: Trainer) -> int:
    """``epochs × steps per epoch`` as the trainer's loader will produce them (``max_steps`` ignored: an
    interrupted run must keep the schedule of the full one)."""
    cfg = trainer.config
    world = int(getattr(trainer, "world_size", 1) or 1)
    data = getattr(trainer, "train_data", None)
    n = len(data) if data is not None else 0
    per_rank = math.ceil(n / world)
    steps_per_epoch = max(1, math.ceil(per_rank / int(cfg.batch_size)))
    return max(1, int(cfg.epochs) * steps_per_epoch)


def _pack(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().flatten().numpy().astype(np.uint8)))


def _unpack(packed: Tensor, shape: Iterable[int]) -> Tensor:
    shape = tuple(int(s) for s in shape)
    bits = np.unpackbits(packed.numpy(), count=math.prod(shape))
    return torch.from_numpy(bits.astype(bool)).view(shape)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x
