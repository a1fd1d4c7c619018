"""UniRepLKNet (Ding et al., CVPR 2024): a universal-perception large-kernel ConvNet.

Faithful to the official implementation: the same architecture, numerics (exact GELU, LayerNorm eps 1e-6,
BatchNorm eps 1e-5, GRN on channels-last) and state-dict keys in training and deploy form, so official
checkpoints load by key (:func:`uniperception.checkpoints.load_official`). Differences from the official
class, all on purpose: nothing is printed, unknown keyword arguments raise instead of being swallowed,
features mode (``features_only=True``) needs no mmcv, and re-parameterisation works for every dtype and device.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..layers.norm import LayerNorm2d
from ..layers.reparam import reparameterize as reparameterize_tree
from ..layers.unireplknet_block import UniRepLKNetBlock
from .base import Backbone
from .registry import PretrainedCfg, register_variant

__all__ = ["UNIREPLKNET_VARIANTS", "UniRepLKNet", "default_kernel_sizes"]

logger = logging.getLogger(__name__)

_HUB = "DingXiaoH/UniRepLKNet"


def _default_kernel_table() -> dict[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    s2_t = (13, 3) * 9
    s2_s = (13, 3, 3) * 9
    return {
        (2, 2, 6, 2): ((3, 3), (13, 13), (13,) * 6, (13, 13)),
        (2, 2, 8, 2): ((3, 3), (13, 13), (13,) * 8, (13, 13)),
        (3, 3, 18, 3): ((3, 3, 3), (13, 13, 13), s2_t, (13, 13, 13)),
        (3, 3, 27, 3): ((3, 3, 3), (13, 13, 13), s2_s, (13, 13, 13)),
    }


#: depths -> default per-block kernel sizes (the official table is keyed by depths, not by variant)
DEFAULT_KERNEL_SIZES = _default_kernel_table()

#: variant letter -> (depths, dims)
UNIREPLKNET_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "a": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "f": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "p": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "n": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "t": ((3, 3, 18, 3), (80, 160, 320, 640)),
    "s": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "b": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "l": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xl": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}


def default_kernel_sizes(depths: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The official default kernel sizes for ``depths``; other depths need explicit ``kernel_sizes``."""
    key = tuple(depths)
    if key not in DEFAULT_KERNEL_SIZES:
        raise InvalidInputError(
            f"no default kernel sizes for depths {key}; pass kernel_sizes= (one tuple per stage), "
            f"or use one of {sorted(DEFAULT_KERNEL_SIZES)}"
        )
    return DEFAULT_KERNEL_SIZES[key]


class UniRepLKNet(Backbone):
    """UniRepLKNet backbone and classifier.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; ``0`` keeps the pooled+normalised features (no head).
        depths: blocks per stage.
        dims: widths per stage.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        layer_scale_init_value: layer-scale init (``None``/``<=0`` disables it).
        head_init_scale: multiplies the initial head weight and bias.
        kernel_sizes: per-stage tuples of per-block kernel sizes (default: the official table by depths).
        deploy: build the re-parameterised form directly.
        with_cp: activation checkpointing in every block (see :meth:`set_grad_checkpointing`).
        use_sync_bn: ``SyncBatchNorm`` everywhere (same keys).
        features_only: return a list of multi-scale maps (strides 4/8/16/32) normalised by ``norm{i}``,
            the official detection/segmentation "features" mode; no ``norm``/``head``.
        out_indices: stages whose maps ``features_only`` returns.
        attempt_use_lk_impl: accepted for compatibility with the official signature; the large-kernel
            implementation is chosen by :mod:`uniperception.ops`, so it has no effect.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        deploy: bool = False,
        with_cp: bool = False,
        use_sync_bn: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        attempt_use_lk_impl: bool = True,
    ) -> None:
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != 4 or len(dims) != 4:
            raise InvalidInputError(f"depths and dims need 4 entries, got {depths} and {dims}")
        if kernel_sizes is None:
            kernel_sizes = default_kernel_sizes(depths)
        kernel_sizes = tuple(tuple(int(k) for k in ks) for ks in kernel_sizes)
        if len(kernel_sizes) != 4 or any(len(ks) != d for ks, d in zip(kernel_sizes, depths, strict=True)):
            raise InvalidInputError(f"kernel_sizes {kernel_sizes} do not match depths {depths}")
        out_indices = tuple(sorted(set(out_indices)))
        if features_only and (not out_indices or any(i not in range(4) for i in out_indices)):
            raise InvalidInputError(f"out_indices must be a non-empty subset of (0, 1, 2, 3), got {out_indices}")
        self.init_kwargs: dict[str, Any] = dict(
            in_chans=in_chans, num_classes=num_classes, depths=depths, dims=dims,
            drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
            head_init_scale=head_init_scale, kernel_sizes=kernel_sizes, deploy=deploy, with_cp=with_cp,
            use_sync_bn=use_sync_bn, features_only=features_only, out_indices=out_indices,
        )
        self.depths, self.dims, self.kernel_sizes = depths, dims, kernel_sizes
        self.in_chans = in_chans
        self.features_only = features_only
        self.out_indices = out_indices if features_only else (3,)
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = with_cp
        #: run in channels-last memory format (same values; faster on CPU and recent GPUs)
        self.channels_last = True
        logger.debug("UniRepLKNet kernel sizes %s, drop_path_rate %s", kernel_sizes, drop_path_rate)

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
                LayerNorm2d(dims[0] // 2),
                nn.GELU(),
                nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
                LayerNorm2d(dims[0]),
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm2d(dims[i + 1]))
            )

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *[
                        UniRepLKNetBlock(
                            dims[i], kernel_sizes[i][j], drop_path=dpr[cur + j],
                            layer_scale_init_value=layer_scale_init_value, deploy=deploy, with_cp=with_cp,
                            use_sync_bn=use_sync_bn,
                        )
                        for j in range(depths[i])
                    ]
                )
            )
            cur += depths[i]

        self.feature_info = [
            {"num_chs": dims[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}"} for i in range(4)
        ]
        self.num_classes = 0 if features_only else num_classes
        if features_only:
            for i in self.out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(dims[i]))
            self.feature_info = [self.feature_info[i] for i in self.out_indices]
        else:
            self._build_classifier(dims[-1], num_classes, head_init_scale)

    # ----------------------------------------------------------------------------------------- utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in every block (same outputs, less memory)."""
        self.grad_checkpointing = enable
        for m in self.modules():
            if isinstance(m, UniRepLKNetBlock):
                m.with_cp = enable

    @property
    def is_deploy(self) -> bool:
        """True when every block is in the re-parameterised form."""
        return all(b.is_reparameterized for b in self.modules() if isinstance(b, UniRepLKNetBlock))

    def reparameterize(self) -> UniRepLKNet:
        """Convert the whole model, in place, to the deploy form (idempotent); returns ``self``."""
        reparameterize_tree(self)
        self.init_kwargs["deploy"] = True
        return self


# --------------------------------------------------------------------------------------------- builders
def _cfg(tag: str, filename: str, **kw: Any) -> PretrainedCfg:
    return PretrainedCfg(tag=tag, filename=filename, hf_hub_id=_HUB, **kw)


_IN22K = {"num_classes": 21841}
_R384 = {"input_size": (3, 384, 384), "crop_pct": 1.0}
PRETRAINED_CFGS: dict[str, list[PretrainedCfg]] = {
    "a": [_cfg("in1k", "unireplknet_a_in1k_224_acc77.03.pth")],
    "f": [_cfg("in1k", "unireplknet_f_in1k_224_acc78.58.pth")],
    "p": [_cfg("in1k", "unireplknet_p_in1k_224_acc80.23.pth")],
    "n": [_cfg("in1k", "unireplknet_n_in1k_224_acc81.64.pth")],
    "t": [_cfg("in1k", "unireplknet_t_in1k_224_acc83.21.pth")],
    "s": [
        _cfg("in1k", "unireplknet_s_in1k_224_acc83.91.pth"),
        _cfg("in22k", "unireplknet_s_in22k_pretrain.pth", **_IN22K),
        _cfg("in22k_ft_in1k_384", "unireplknet_s_in22k_to_in1k_384_acc86.44.pth", **_R384),
    ],
    "b": [
        _cfg("in22k_ft_in1k_384", "unireplknet_b_in22k_to_in1k_384_acc87.40.pth", **_R384),
        _cfg("in22k", "unireplknet_b_in22k_pretrain.pth", **_IN22K),
    ],
    "l": [
        _cfg("in22k_ft_in1k_384", "unireplknet_l_in22k_to_in1k_384_acc87.88.pth", **_R384),
        _cfg("in22k", "unireplknet_l_in22k_pretrain.pth", input_size=(3, 192, 192), **_IN22K),
    ],
    "xl": [
        _cfg("in22k_ft_in1k_384", "unireplknet_xl_in22k_to_in1k_384_acc87.96.pth", **_R384),
        _cfg("in22k", "unireplknet_xl_in22k_pretrain.pth", input_size=(3, 192, 192), **_IN22K),
    ],
}


def _create(
    variant: str,
    pretrained: bool | str | os.PathLike[str] = False,
    pretrained_tag: str | None = None,
    **kwargs: Any,
) -> UniRepLKNet:
    from ..checkpoints import load_pretrained  # local import: checkpoints imports the backbones

    depths, dims = UNIREPLKNET_VARIANTS[variant]
    name = f"unireplknet_{variant}"
    cfgs = PRETRAINED_CFGS[variant]
    cfg = next((c for c in cfgs if c.tag == pretrained_tag), cfgs[0]) if pretrained_tag else cfgs[0]
    if pretrained and "num_classes" not in kwargs and not kwargs.get("features_only", False):
        kwargs["num_classes"] = cfg.num_classes
    # depths/dims may be overridden (timm's model_args style) for custom sizes of a named family
    model = UniRepLKNet(depths=kwargs.pop("depths", depths), dims=kwargs.pop("dims", dims), **kwargs)
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    if pretrained:
        load_pretrained(model, cfg, pretrained, name=name)
    return model


def _make_builder(variant: str):
    depths, dims = UNIREPLKNET_VARIANTS[variant]
    doc = (
        f"UniRepLKNet-{variant.upper()} (depths {depths}, dims {dims}). ``pretrained`` is False, True "
        f"(official weights of the tag, through the hub cache) or a local file/directory."
    )
    return register_variant(f"unireplknet_{variant}", functools.partial(_create, variant), doc, PRETRAINED_CFGS[variant])


unireplknet_a = _make_builder("a")
unireplknet_f = _make_builder("f")
unireplknet_p = _make_builder("p")
unireplknet_n = _make_builder("n")
unireplknet_t = _make_builder("t")
unireplknet_s = _make_builder("s")
unireplknet_b = _make_builder("b")
unireplknet_l = _make_builder("l")
unireplknet_xl = _make_builder("xl")
