"""Helpers shared by tests: randomise every parameter and statistic so re-parameterisation bugs cannot hide."""

from __future__ import annotations

import torch
from torch import nn

from uniperception.layers import GRN, SLaKBlock, UniRepLKNetBlock


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise weights, biases, BatchNorm statistics (some negative BN weights), GRN and layer scale."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g, dtype=torch.float64) * std + mean).to(t.dtype)

    def unif(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(t.dtype)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(rnd(m.weight, fan_in**-0.5))
            if m.bias is not None:
                m.bias.copy_(rnd(m.bias, 0.2))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            sign = torch.where(torch.rand(m.weight.shape, generator=g) < 0.25, -1.0, 1.0).to(m.weight.dtype)
            m.weight.copy_(unif(m.weight, 0.5, 1.5) * sign)
            m.bias.copy_(rnd(m.bias, 0.3))
            m.running_mean.copy_(rnd(m.running_mean, 0.5))
            m.running_var.copy_(unif(m.running_var, 0.25, 2.5))
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(unif(m.weight, 0.5, 1.5))
            m.bias.copy_(rnd(m.bias, 0.2))
        elif isinstance(m, GRN):
            m.gamma.copy_(rnd(m.gamma, 0.5))
            if m.beta is not None:
                m.beta.copy_(rnd(m.beta, 0.3))
        if isinstance(m, (UniRepLKNetBlock, SLaKBlock)) and getattr(m, "gamma", None) is not None:
            sign = torch.where(torch.rand(m.gamma.shape, generator=g) < 0.3, -1.0, 1.0).to(m.gamma.dtype)
            m.gamma.copy_(unif(m.gamma, 0.2, 0.8) * sign)
    return model


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| relative to max |b| (a scale-aware float-rounding comparison)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
