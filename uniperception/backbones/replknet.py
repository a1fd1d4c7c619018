"""RepLKNet (Ding et al., CVPR 2022): "Scaling Up Your Kernels to 31x31".

Faithful to the official ``replknet.py``: same architecture and numerics (BN eps 1e-5, ReLU around the large
kernel, exact GELU in the FFN) and the same state-dict keys in training and deploy form (``lkb_reparam``), so
official checkpoints load by key (:func:`uniperception.checkpoints.load_official`, which uses
:meth:`RepLKNet.convert_official_state_dict`). Differences from the official class, all on purpose: no printing,
no sticky module-global SyncBN switch (``use_sync_bn`` defaults to False and affects only this model), the
builders do not turn activation checkpointing on by default, unknown keyword arguments raise, features mode is
also reachable timm-style (``features_only=True``), an empty ``out_indices`` is rejected with a clear message,
re-parameterisation works for every dtype and device (and keeps padding when the fast conv engine is used),
and every stride-1 depthwise conv of the large-kernel modules runs through :mod:`uniperception.ops`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError
from ..layers.dilated_reparam import make_batchnorm
from ..layers.reparam import reparameterize as reparameterize_tree
from ..layers.replknet_blocks import ConvBN, ReparamLargeKernelConv, RepLKNetStage
from .base import Backbone
from .registry import PretrainedCfg, register_variant

if TYPE_CHECKING:
    from ..checkpoints import Conversion, LoadReport

__all__ = ["REPLKNET_VARIANTS", "RepLKNet"]

logger = logging.getLogger(__name__)

#: variant -> (large kernel sizes, layers, channels, small kernel, dw_ratio)
REPLKNET_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int | None, float]] = {
    "31b": ((31, 29, 27, 13), (2, 2, 18, 2), (128, 256, 512, 1024), 5, 1.0),
    "31l": ((31, 29, 27, 13), (2, 2, 18, 2), (192, 384, 768, 1536), 5, 1.0),
    "xl": ((27, 27, 27, 13), (2, 2, 18, 2), (256, 512, 1024, 2048), None, 1.5),
}


class RepLKNet(Backbone):
    """RepLKNet backbone and classifier (official argument names).

    Args:
        large_kernel_sizes: large kernel per stage (odd).
        layers: (RepLKBlock, ConvFFN) pairs per stage.
        channels: widths per stage.
        drop_path_rate: stochastic depth, one linearly increasing rate per pair.
        small_kernel: the small re-parameterisation kernel (``None``: no small branch, as XL).
        dw_ratio: width of the large-kernel branch as a multiple of the stage width.
        ffn_ratio: hidden width of the ConvFFN as a multiple of the stage width.
        in_channels: input channels (``in_chans`` is an alias).
        num_classes: classifier outputs; ``0`` keeps the pooled, normalised features; ``None`` means features
            mode (the official downstream usage, with ``out_indices``).
        out_indices: stages returned in features mode (default all four).
        use_checkpoint: activation checkpointing in every block (``with_cp`` is an alias).
        small_kernel_merged: build the deploy form directly (``deploy`` is the same switch).
        use_sync_bn: ``SyncBatchNorm`` everywhere (same keys).
        norm_intermediate_features: ``stages[i].norm`` = BN on the returned maps (features mode only; XL).
        deploy: build the re-parameterised form (one ``lkb_reparam`` conv per large kernel).
        features_only: return a list of maps at strides 4/8/16/32 (``stages[i].norm`` applied); no norm/head.
        in_chans: alias of ``in_channels`` (every backbone of the package accepts it).
        with_cp: alias of ``use_checkpoint``.
    """

    head_init = "default"  # the official RepLKNet leaves the classifier at PyTorch's init

    def __init__(
        self,
        large_kernel_sizes: Sequence[int] = (31, 29, 27, 13),
        layers: Sequence[int] = (2, 2, 18, 2),
        channels: Sequence[int] = (128, 256, 512, 1024),
        drop_path_rate: float = 0.0,
        small_kernel: int | None = 5,
        dw_ratio: float = 1,
        ffn_ratio: float = 4,
        in_channels: int | None = None,
        num_classes: int | None = 1000,
        out_indices: Sequence[int] | None = None,
        use_checkpoint: bool = False,
        small_kernel_merged: bool = False,
        use_sync_bn: bool = False,
        norm_intermediate_features: bool = False,
        deploy: bool = False,
        features_only: bool = False,
        in_chans: int | None = None,
        with_cp: bool | None = None,
    ) -> None:
        super().__init__()
        if in_chans is not None and in_channels is not None and in_chans != in_channels:
            raise InvalidInputError(f"in_chans={in_chans} and in_channels={in_channels} disagree; pass one of them")
        in_ch = in_chans if in_chans is not None else (in_channels if in_channels is not None else 3)
        use_cp = bool(use_checkpoint or with_cp)
        merged = bool(deploy or small_kernel_merged)
        large_kernel_sizes, layers, channels = tuple(large_kernel_sizes), tuple(layers), tuple(channels)
        num_stages = len(layers)
        if not (num_stages == len(large_kernel_sizes) == len(channels)) or num_stages == 0:
            raise InvalidInputError(
                f"large_kernel_sizes {large_kernel_sizes}, layers {layers} and channels {channels} need one entry "
                "per stage"
            )
        features = bool(features_only or num_classes is None)
        if features:
            out_indices = tuple(range(num_stages)) if out_indices is None else tuple(sorted(set(out_indices)))
            if not out_indices or any(i not in range(num_stages) for i in out_indices):
                raise InvalidInputError(
                    f"out_indices must be a non-empty subset of {tuple(range(num_stages))}, got {out_indices}"
                )
        else:
            if out_indices is not None:
                raise InvalidInputError(
                    "out_indices selects feature maps: pass features_only=True (or num_classes=None, as the "
                    "official downstream code does) together with it"
                )
            if norm_intermediate_features:
                raise InvalidInputError(
                    "norm_intermediate_features is for the features mode only (features_only=True); "
                    "a classifier does not need normalised intermediate maps"
                )
        self.init_kwargs: dict[str, Any] = dict(
            large_kernel_sizes=large_kernel_sizes, layers=layers, channels=channels, drop_path_rate=drop_path_rate,
            small_kernel=small_kernel, dw_ratio=dw_ratio, ffn_ratio=ffn_ratio, in_channels=in_ch,
            num_classes=None if features else num_classes, out_indices=out_indices if features else None,
            use_checkpoint=use_cp, small_kernel_merged=merged, use_sync_bn=use_sync_bn,
            norm_intermediate_features=norm_intermediate_features, features_only=features,
        )
        self.large_kernel_sizes, self.layers, self.channels = large_kernel_sizes, layers, channels
        self.num_stages = num_stages
        self.in_chans = in_ch
        self.features_only = features
        self.out_indices: tuple[int, ...] = tuple(out_indices) if features else (num_stages - 1,)  # type: ignore[arg-type]
        self.num_features = self.head_hidden_size = channels[-1]
        self.num_classes = 0 if features else int(num_classes)  # type: ignore[arg-type]
        self.grad_checkpointing = use_cp
        #: run in channels-last memory format (same values; faster 1×1 and depthwise convs on CPU)
        self.channels_last = True
        logger.debug("RepLKNet kernels %s layers %s channels %s merged=%s", large_kernel_sizes, layers, channels,
                     merged)

        c0 = channels[0]
        self.stem = nn.ModuleList([
            ConvBN(in_ch, c0, 3, stride=2, padding=1, relu=True, use_sync_bn=use_sync_bn),
            ConvBN(c0, c0, 3, stride=1, padding=1, groups=c0, relu=True, use_sync_bn=use_sync_bn),
            ConvBN(c0, c0, 1, stride=1, padding=0, relu=True, use_sync_bn=use_sync_bn),
            ConvBN(c0, c0, 3, stride=2, padding=1, groups=c0, relu=True, use_sync_bn=use_sync_bn),
        ])
        dpr = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i in range(num_stages):
            self.stages.append(RepLKNetStage(
                channels[i], layers[i], large_kernel_sizes[i], dpr[sum(layers[:i]):sum(layers[:i + 1])],
                small_kernel, dw_ratio=dw_ratio, ffn_ratio=ffn_ratio, use_checkpoint=use_cp,
                small_kernel_merged=merged, norm_intermediate_features=norm_intermediate_features,
                use_sync_bn=use_sync_bn,
            ))
            if i < num_stages - 1:
                self.transitions.append(nn.Sequential(
                    ConvBN(channels[i], channels[i + 1], 1, padding=0, relu=True, use_sync_bn=use_sync_bn),
                    ConvBN(channels[i + 1], channels[i + 1], 3, stride=2, padding=1, groups=channels[i + 1],
                           relu=True, use_sync_bn=use_sync_bn),
                ))
        self.feature_info = [
            {"num_chs": channels[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}"} for i in range(num_stages)
        ]
        if features:
            self.feature_info = [self.feature_info[i] for i in self.out_indices]
        else:
            self.norm = make_batchnorm(channels[-1], use_sync_bn)
            self.head: nn.Module = nn.Linear(channels[-1], self.num_classes) if self.num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------------------------------- forward
    def _stem(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self._to_layout(x)
        for layer in self.stem:
            x = layer(x)
        return x

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Stage outputs (before ``stages[i].norm`` and the transition) up to the last needed stage."""
        x = self._stem(x)
        outs = []
        last = max(self.out_indices)
        for i in range(last + 1):
            x = self._stage_out(self.stages[i](x))
            outs.append(x)
            if i < last:
                x = self.transitions[i](x)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map (``B × channels[-1] × ⌈H/32⌉ × ⌈W/32⌉``), before the final norm."""
        x = self._stem(x)
        for i in range(self.num_stages):
            x = self._stage_out(self.stages[i](x))
            if i < self.num_stages - 1:
                x = self.transitions[i](x)
        return x

    def pool_and_norm(self, x: Tensor) -> Tensor:
        """BN on the final map, then global average pool (the official head order)."""
        return self.norm(x).mean((-2, -1))

    def feature_norm(self, i: int) -> nn.Module:
        """RepLKNet normalises feature maps with each stage's own ``norm``."""
        return self.stages[i].norm  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------- utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in every stage (same outputs, less memory)."""
        self.grad_checkpointing = enable
        self.init_kwargs["use_checkpoint"] = enable
        for s in self.stages:
            s.use_checkpoint = enable  # type: ignore[assignment]

    @property
    def is_deploy(self) -> bool:
        """True when every large-kernel module is merged (deploy form)."""
        return all(m.is_merged for m in self.modules() if isinstance(m, ReparamLargeKernelConv))

    def reparameterize(self) -> RepLKNet:
        """Merge every large-kernel module, in place, into its deploy form (idempotent); returns ``self``.

        Only the large-kernel modules change (official ``structural_reparam``): the other conv-BN pairs and
        the pre-norms keep their keys, so the state dict is the official deploy one.
        """
        reparameterize_tree(self)
        self.init_kwargs["small_kernel_merged"] = True
        return self

    # official name
    structural_reparam = reparameterize

    # ----------------------------------------------------------------------------------------- checkpoints
    @staticmethod
    def convert_official_state_dict(
        sd: dict[str, Tensor], model: nn.Module, report: LoadReport, adapt_head: bool, strict: bool
    ) -> Conversion:
        """Official RepLKNet state dict → keys of ``model`` (called by :func:`~uniperception.checkpoints.load_official`).

        Handles: features-mode models (classification ``norm``/``head`` dropped; missing ``stages.i.norm`` kept
        at their initial values, as the official non-strict downstream loader does), ``adapt_head``, a deploy
        checkpoint into a training-form model (the model is re-parameterised first) and a training checkpoint
        into a deploy model (merged on a twin, then loaded).
        """
        assert isinstance(model, RepLKNet)
        sd = dict(sd)
        own = model.state_dict()
        if model.features_only:
            _drop_classifier(sd, report)
            for k in [k for k in own if ".norm." in k and k.startswith("stages.") and k not in sd]:
                sd[k] = own[k].detach().clone()
                report.converted.append(f"{k} absent: kept its initial value (official non-strict loading)")
        elif adapt_head:
            _adapt_head(sd, own, report)
        ckpt_form = _replknet_form(sd)
        model_form = "deploy" if model.is_deploy else "train"
        return convert_forms(
            sd, model, report, strict, ckpt_form, model_form,
            {"train": {"small_kernel_merged": False}, "deploy": {"small_kernel_merged": True}},
            {"deploy": lambda m: m.reparameterize()},  # type: ignore[operator]
        )


def _replknet_form(sd: dict[str, Tensor]) -> str | None:
    deploy = any(".large_kernel.lkb_reparam." in k for k in sd)
    train = any(".large_kernel.lkb_origin." in k for k in sd)
    if deploy == train:
        return None
    return "deploy" if deploy else "train"


# ----------------------------------------------------------------------- conversion helpers (also used by SLaK)
def _drop_classifier(sd: dict[str, Tensor], report: LoadReport) -> None:
    for k in [k for k in sd if k.startswith(("norm.", "head."))]:
        del sd[k]
        report.skipped.append(f"{k} (classification layer; features_only model)")


def _adapt_head(sd: dict[str, Tensor], own: dict[str, Tensor], report: LoadReport) -> None:
    if "head.weight" not in sd:
        return
    head = own.get("head.weight")
    if head is not None and tuple(head.shape) == tuple(sd["head.weight"].shape):
        return
    for k in ("head.weight", "head.bias"):
        if sd.pop(k, None) is not None:
            report.skipped.append(f"{k} (head size differs; model head kept freshly initialised)")
        if k in own:
            sd[k] = own[k].detach().clone()


def convert_forms(
    sd: dict[str, Tensor],
    model: nn.Module,
    report: LoadReport,
    strict: bool,
    ckpt_form: str | None,
    model_form: str | None,
    build_kwargs: dict[str, dict[str, Any]],
    to_form: dict[str, Callable[[nn.Module], Any]],
    order: Sequence[str] = ("train", "deploy"),
) -> Conversion:
    """Bring a checkpoint and a model to the same form (``order`` lists forms from training to inference).

    A checkpoint further along than the model: the model is converted (after the key check) with
    ``to_form[ckpt_form]``. A checkpoint earlier than the model: it is loaded into a twin built in the training
    form (``build_kwargs[order[0]]``), brought to the model's form, and the twin's state dict is returned.
    """
    from ..checkpoints import Conversion, load_official

    if ckpt_form is None or ckpt_form == model_form or model_form is None:
        return Conversion(sd)
    cls = type(model)
    init = dict(model.init_kwargs)  # type: ignore[arg-type]
    if order.index(ckpt_form) > order.index(model_form):
        with torch.device("meta"):
            twin = cls(**{**init, **build_kwargs[order[0]]})
            to_form[ckpt_form](twin)
        report.converted.append(f"checkpoint is {ckpt_form} form: model re-parameterised to it before loading")
        return Conversion(sd, expected={k: tuple(v.shape) for k, v in twin.state_dict().items()},
                          prepare=lambda: to_form[ckpt_form](model))
    ref = next(model.parameters())
    twin = cls(**{**init, **build_kwargs[order[0]]}).to(device=ref.device, dtype=ref.dtype)
    if ckpt_form != order[0]:
        to_form[ckpt_form](twin)
    load_official(twin, sd, strict=strict, adapt_head=False, _report=report)
    to_form[model_form](twin)
    report.converted.append(f"checkpoint is {ckpt_form} form: re-parameterised into the {model_form} model")
    return Conversion(dict(twin.state_dict()))


# --------------------------------------------------------------------------------------------- builders
_IN22K = {"num_classes": 21841}
_R384 = {"input_size": (3, 384, 384), "crop_pct": 1.0}
_NOTE = ("official release (Google Drive / Baidu links in the RepLKNet README; no hub copy): download it and pass "
         "its path or directory as pretrained=...")


def _cfg(tag: str, filename: str, **kw: Any) -> PretrainedCfg:
    return PretrainedCfg(tag=tag, filename=filename, hf_hub_id=None, notes=_NOTE, **kw)


PRETRAINED_CFGS: dict[str, list[PretrainedCfg]] = {
    "31b": [
        _cfg("in1k", "RepLKNet-31B_ImageNet-1K_224.pth"),
        _cfg("in1k_384", "RepLKNet-31B_ImageNet-1K_384.pth", **_R384),
        _cfg("in22k_ft_in1k", "RepLKNet-31B_ImageNet-22K-to-1K_224.pth"),
        _cfg("in22k_ft_in1k_384", "RepLKNet-31B_ImageNet-22K-to-1K_384.pth", **_R384),
        _cfg("in22k", "RepLKNet-31B_ImageNet-22K.pth", **_IN22K),
    ],
    "31l": [
        _cfg("in22k_ft_in1k_384", "RepLKNet-31L_ImageNet-22K-to-1K_384.pth", **_R384),
        _cfg("in22k", "RepLKNet-31L_ImageNet-22K.pth", **_IN22K),
    ],
    "xl": [
        _cfg("md73m_ft_in1k_320", "RepLKNet-XL_MegData73M_ImageNet1K.pth", input_size=(3, 320, 320),
             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ],
}

#: keyword defaults of the official builders (``create_RepLKNet31B`` …); activation checkpointing excepted
BUILDER_DEFAULTS: dict[str, Any] = {"drop_path_rate": 0.3}


def _create(
    variant: str,
    pretrained: bool | str | os.PathLike[str] = False,
    pretrained_tag: str | None = None,
    **kwargs: Any,
) -> RepLKNet:
    from ..checkpoints import load_pretrained  # local import: checkpoints imports the backbones

    lks, layers, channels, small_kernel, dw_ratio = REPLKNET_VARIANTS[variant]
    cfgs = PRETRAINED_CFGS[variant]
    cfg = next((c for c in cfgs if c.tag == pretrained_tag), cfgs[0]) if pretrained_tag else cfgs[0]
    if pretrained and "num_classes" not in kwargs and not kwargs.get("features_only", False):
        kwargs["num_classes"] = cfg.num_classes
    arch = {"large_kernel_sizes": lks, "layers": layers, "channels": channels, "small_kernel": small_kernel,
            "dw_ratio": dw_ratio}
    model = RepLKNet(**{**arch, **BUILDER_DEFAULTS, **kwargs})  # kwargs may resize the family
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    if pretrained:
        load_pretrained(model, cfg, pretrained, name=f"replknet_{variant}")
    return model


def _make_builder(variant: str):
    lks, layers, channels, small_kernel, dw_ratio = REPLKNET_VARIANTS[variant]
    doc = (
        f"RepLKNet-{variant.upper()} (kernels {lks}, layers {layers}, channels {channels}, small kernel "
        f"{small_kernel}, dw_ratio {dw_ratio}; drop_path_rate 0.3 as the official builder). ``pretrained`` is "
        "False or a local official file/directory."
    )
    return register_variant(f"replknet_{variant}", functools.partial(_create, variant), doc, PRETRAINED_CFGS[variant])


replknet_31b = _make_builder("31b")
replknet_31l = _make_builder("31l")
replknet_xl = _make_builder("xl")
