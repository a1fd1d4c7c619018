"""SLaK (Liu et al., ICLR 2023): "More ConvNets in the 2020s: Scaling up Kernels Beyond 51×51 using Sparsity".

Faithful to the official ``models/SLaK.py``: ConvNeXt layout, decomposed ``M×N`` + ``N×M`` + ``N×N`` large kernels
with one BatchNorm each, LayerNorm eps 1e-6, exact GELU, layer scale, and the official state-dict keys
(``LoRA1``/``LoRA2``/``small_conv``), so released checkpoints load by key (:func:`uniperception.checkpoints.
load_official`; the pre-2022-07-12 names ``Decom1``/``Decom2`` are accepted). The official CUDA op's per-axis
"same" padding is reproduced exactly (see :mod:`uniperception.layers.slak_blocks`). Differences from the
official class, all on purpose: ``Decom`` defaults to True (the released models need it), no CUDA extension is
needed, nothing is printed, unknown keyword arguments raise, inputs smaller than the network can downsample are
rejected with a clear message, a features mode (``features_only=True``, ``norm0..3`` as the official
segmentation/detection copies) is built in, and two exact inference forms exist (the official code has none):
:meth:`SLaK.reparameterize` with ``form="dense"`` (default, ``deploy=True``: one merged kernel per block,
``large_kernel.lkb_reparam``) or ``form="rect"`` (BN folded into each rectangular branch).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError
from ..layers.norm import LayerNorm2d
from ..layers.slak_blocks import FORMS, SLaKBlock, SLaKLargeKernelConv
from .base import Backbone, trunc_normal_init
from .registry import PretrainedCfg, register_variant
from .replknet import _adapt_head, _drop_classifier, convert_forms

if TYPE_CHECKING:
    from ..checkpoints import Conversion, LoadReport

__all__ = ["SLAK_VARIANTS", "SLaK"]

logger = logging.getLogger(__name__)

#: variant -> (depths, base dims before ``width_factor``)
SLAK_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "t": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "s": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "b": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}


class SLaK(Backbone):
    """SLaK backbone and classifier (official argument names).

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; ``0`` keeps the pooled, normalised features (no head).
        depths: blocks per stage.
        dims: base widths per stage; the model uses ``int(d · width_factor)``.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        layer_scale_init_value: initial layer scale (``<= 0``/``None``: no ``gamma``).
        head_init_scale: multiplies the initial head weight and bias.
        kernel_size: long side ``M`` of stages 0–3, then the shared short side ``N`` (5 entries, odd).
        width_factor: width multiplier (SLaK uses 1.3).
        Decom: decomposed rectangular kernels (True, the released models) or a dense ``M×M`` kernel
            (``lkb_origin``; the official constructor's default ``None`` means this).
        bn: a BatchNorm after every large-kernel branch.
        deploy: build the merged dense form directly (``large_kernel.lkb_reparam`` in every block).
        features_only: return a list of maps at strides 4/8/16/32 normalised by ``norm{i}`` (official
            segmentation/detection copies); no ``norm``/``head``.
        out_indices: stages whose maps ``features_only`` returns.
        use_sync_bn: ``SyncBatchNorm`` in the large kernels (same keys).
        with_cp: activation checkpointing in every block.
        LoRA: alias of ``Decom`` (the official detection copy's name).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        kernel_size: Sequence[int] = (51, 49, 47, 13, 5),
        width_factor: float = 1.3,
        Decom: bool | None = True,  # official name
        bn: bool = True,
        deploy: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        use_sync_bn: bool = False,
        with_cp: bool = False,
        LoRA: bool | None = None,  # official name (detection copy)
    ) -> None:
        super().__init__()
        if LoRA is not None:
            Decom = LoRA
        decom = bool(Decom)
        depths, base_dims, kernel_size = tuple(depths), tuple(dims), tuple(int(k) for k in kernel_size)
        if len(depths) != 4 or len(base_dims) != 4:
            raise InvalidInputError(f"depths and dims need 4 entries, got {depths} and {base_dims}")
        if len(kernel_size) != 5:
            raise InvalidInputError(
                f"kernel_size needs 5 entries (long side per stage, then the short side), got {kernel_size}"
            )
        dims = tuple(int(d * width_factor) for d in base_dims)
        out_indices = tuple(sorted(set(out_indices)))
        if features_only and (not out_indices or any(i not in range(4) for i in out_indices)):
            raise InvalidInputError(f"out_indices must be a non-empty subset of (0, 1, 2, 3), got {out_indices}")
        self.init_kwargs: dict[str, Any] = dict(
            in_chans=in_chans, num_classes=num_classes, depths=depths, dims=base_dims, drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale, kernel_size=kernel_size,
            width_factor=width_factor, Decom=decom, bn=bn, deploy=deploy, features_only=features_only,
            out_indices=out_indices, use_sync_bn=use_sync_bn, with_cp=with_cp,
        )
        self.depths, self.dims, self.kernel_size = depths, dims, kernel_size
        self.in_chans = in_chans
        self.features_only = features_only
        self.out_indices = out_indices if features_only else (3,)
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = with_cp
        #: run in channels-last memory format (same values; the NHWC LayerNorm/MLP views become free)
        self.channels_last = True
        logger.debug("SLaK dims %s kernels %s Decom=%s bn=%s deploy=%s", dims, kernel_size, decom, bn, deploy)

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0])))
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            )
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                SLaKBlock(dims[i], (kernel_size[i], kernel_size[-1]), drop_path=dpr[cur + j],
                          layer_scale_init_value=layer_scale_init_value, decom=decom, bn=bn, deploy=deploy,
                          use_sync_bn=use_sync_bn, with_cp=with_cp)
                for j in range(depths[i])
            ]))
            cur += depths[i]
        self.feature_info = [
            {"num_chs": dims[i], "reduction": 2 ** (i + 2), "module": f"stages.{i}"} for i in range(4)
        ]
        self.num_classes = 0 if features_only else num_classes
        if features_only:
            for i in self.out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(dims[i]))
            self.feature_info = [self.feature_info[i] for i in self.out_indices]
            self.apply(trunc_normal_init)
        else:
            self._build_classifier(dims[-1], num_classes, head_init_scale)

    # ----------------------------------------------------------------------------------------- forward
    def min_input_side(self, last_stage: int) -> int:
        """SLaK's downsampling convs have no padding: stage ``i`` needs ``4·2^i`` pixels."""
        return 4 * 2**last_stage

    # ----------------------------------------------------------------------------------------- utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in every block (same outputs, less memory)."""
        self.grad_checkpointing = enable
        self.init_kwargs["with_cp"] = enable
        for m in self.modules():
            if isinstance(m, SLaKBlock):
                m.with_cp = enable

    @property
    def reparam_form(self) -> str:
        """``"train"``, ``"rect"`` or ``"dense"`` (the form of the large kernels; ``"mixed"`` if they differ)."""
        forms = {m.form for m in self.modules() if isinstance(m, SLaKLargeKernelConv)}
        return forms.pop() if len(forms) == 1 else "mixed"

    @property
    def is_deploy(self) -> bool:
        """True when every large kernel is merged into one dense kernel (the ``deploy=True`` layout)."""
        return self.reparam_form == "dense"

    def reparameterize(self, form: str = "dense") -> SLaK:
        """Convert every large kernel, in place, to an inference form (idempotent); returns ``self``.

        ``"dense"`` (default; what ``deploy=True`` builds): one merged ``L×L`` kernel per block,
        ``large_kernel.lkb_reparam.weight/bias``. ``"rect"``: each branch keeps its rectangular kernel with its BN
        folded in (``LoRA1/LoRA2/small_conv.conv.weight/bias``). A ``"rect"`` model can go on to ``"dense"``.
        Both are exact (eval-mode BN statistics). Measured on a 2-core CPU (docs/benchmarks.md), ``"rect"`` runs
        SLaK-T 1.09× faster than ``"dense"`` (1.22× without the conv engine): prefer it for CPU inference.
        """
        if form not in FORMS[1:]:
            raise InvalidInputError(f"form must be 'dense' or 'rect', got {form!r}")
        for m in self.modules():
            if isinstance(m, SLaKLargeKernelConv):
                m.reparameterize(form)
        if form == "dense":
            self.init_kwargs["deploy"] = True
        return self

    # ----------------------------------------------------------------------------------------- checkpoints
    @staticmethod
    def convert_official_state_dict(
        sd: dict[str, Tensor], model: nn.Module, report: LoadReport, adapt_head: bool, strict: bool
    ) -> Conversion:
        """Official SLaK state dict → keys of ``model`` (called by :func:`~uniperception.checkpoints.load_official`).

        Handles: the old branch names ``Decom1``/``Decom2`` (→ ``LoRA1``/``LoRA2``); features-mode models
        (classification ``norm``/``head`` dropped, absent ``norm{i}`` kept at their initial values, as the official
        non-strict downstream loader does); ``adapt_head``; and every pair of forms among training, ``rect`` and
        ``dense`` (a checkpoint further along re-parameterises the model first; an earlier one is converted on a
        twin).
        """
        assert isinstance(model, SLaK)
        sd = dict(sd)
        own = model.state_dict()
        for k in [k for k in sd if ".large_kernel.Decom1." in k or ".large_kernel.Decom2." in k]:
            new = k.replace(".large_kernel.Decom1.", ".large_kernel.LoRA1.").replace(
                ".large_kernel.Decom2.", ".large_kernel.LoRA2.")
            sd[new] = sd.pop(k)
            report.converted.append(f"{k} -> {new}")
        if model.features_only:
            _drop_classifier(sd, report)
            for i in range(4):
                for suffix in ("weight", "bias"):
                    key = f"norm{i}.{suffix}"
                    if i not in model.out_indices:
                        if sd.pop(key, None) is not None:
                            report.skipped.append(f"{key} (stage {i} not in out_indices)")
                    elif key not in sd:
                        sd[key] = own[key].detach().clone()
                        report.converted.append(f"{key} absent: kept its initial value (official behaviour)")
        elif adapt_head:
            _adapt_head(sd, own, report)
        ckpt_form = _slak_form(sd)
        model_form = model.reparam_form
        if model_form == "mixed":
            model_form = None  # type: ignore[assignment]
        return convert_forms(
            sd, model, report, strict, ckpt_form, model_form,
            {"train": {"deploy": False}},
            {"rect": lambda m: m.reparameterize("rect"),  # type: ignore[operator]
             "dense": lambda m: m.reparameterize("dense")},  # type: ignore[operator]
            order=FORMS,
        )


def _slak_form(sd: dict[str, Tensor]) -> str | None:
    forms = set()
    for k in sd:
        if ".large_kernel." not in k:
            continue
        if ".large_kernel.lkb_reparam." in k:
            forms.add("dense")
        elif k.endswith(".bn.running_var"):
            forms.add("train")
        elif k.endswith(".conv.bias"):
            forms.add("rect")
    if len(forms) == 1:
        return forms.pop()
    if not forms and any(k.endswith(".large_kernel.LoRA1.conv.weight") for k in sd):
        return "train"  # bn=False training form: bias-free convs only
    return None


# --------------------------------------------------------------------------------------------- builders
_NOTE = ("official release (Google Drive / SURFdrive links in the SLaK README; no hub copy, file name not fixed by "
         "the spec): download it and pass its path (or a directory holding only it) as pretrained=...")

PRETRAINED_CFGS: dict[str, list[PretrainedCfg]] = {
    v: [PretrainedCfg(tag="in1k", filename=f"SLaK_{name}_checkpoint.pth", hf_hub_id=None, notes=_NOTE)]
    for v, name in (("t", "tiny"), ("s", "small"), ("b", "base"))
}

#: keyword defaults of the official SLaK recipe (README commands)
BUILDER_DEFAULTS: dict[str, Any] = {"kernel_size": (51, 49, 47, 13, 5), "width_factor": 1.3, "Decom": True}


def _create(
    variant: str,
    pretrained: bool | str | os.PathLike[str] = False,
    pretrained_tag: str | None = None,
    **kwargs: Any,
) -> SLaK:
    from ..checkpoints import load_pretrained  # local import: checkpoints imports the backbones

    depths, dims = SLAK_VARIANTS[variant]
    cfgs = PRETRAINED_CFGS[variant]
    cfg = next((c for c in cfgs if c.tag == pretrained_tag), cfgs[0]) if pretrained_tag else cfgs[0]
    if pretrained and "num_classes" not in kwargs and not kwargs.get("features_only", False):
        kwargs["num_classes"] = cfg.num_classes
    model = SLaK(**{"depths": depths, "dims": dims, **BUILDER_DEFAULTS, **kwargs})  # kwargs may resize the family
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    if pretrained:
        load_pretrained(model, cfg, pretrained, name=f"slak_{variant}")
    return model


def _make_builder(variant: str):
    depths, dims = SLAK_VARIANTS[variant]
    doc = (
        f"SLaK-{variant.upper()} (depths {depths}, base dims {dims} × 1.3, kernels 51/49/47/13 × 5, decomposed). "
        "``pretrained`` is False or a local official file/directory."
    )
    return register_variant(f"slak_{variant}", functools.partial(_create, variant), doc, PRETRAINED_CFGS[variant])


slak_t = _make_builder("t")
slak_s = _make_builder("s")
slak_b = _make_builder("b")
