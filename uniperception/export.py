"""Export the re-parameterised network (adapter embedding + backbone + head) and verify it on the spot.

Formats: ``onnx`` (checked with onnxruntime), ``pt2`` (``torch.export``, reloaded with ``torch.export.load``)
and ``torchscript`` (``torch.jit.trace``; deprecated in recent PyTorch, kept for older runtimes). The
processor stays in Python: its settings and the label names are written to ``<out>.json`` beside the file.
Every export is reloaded and compared with the eager model on random inputs (two batch sizes, so the
dynamic batch axis is exercised); a relative error above ``tolerance`` raises :class:`ExportError`.

``quantize="int8"`` (ONNX only) adds dynamic int8 quantisation with onnxruntime
(``onnxruntime.quantization.quantize_dynamic``): the weights of the matrix products are stored as int8
(per output channel) and the activations are quantised on the fly. Only ``MatMul``/``Gemm`` nodes with a
constant weight are quantised: onnxruntime runs them as fused int8 GEMMs, whereas its ``ConvInteger``
kernel is several times *slower* than float32 ``Conv`` on CPU (measured for UniRepLKNet-A: 3× slower with
the dense convolutions quantised, 7× with the depthwise ones too; quantising only the stem and downsampling
convolutions shrinks the file a further 25% but costs ~20% of the int8 speed). UniRepLKNet blocks normally
run their pointwise layers as 1×1 convolutions; for an int8 export they are traced in the official NHWC
form (``Linear`` on permuted views, the same maths) so that those layers become quantisable ``MatMul``
nodes. The depthwise and dense (stem, downsampling, SE) convolutions, normalisations and GRN stay float32.
Quantisation changes the numbers: the int8 file is verified against the eager float32 model with the looser
:data:`INT8_TOLERANCE` (relative to the largest logit), and the report and the sidecar also give the top-1
agreement on the random inputs. Bad ``format``/``quantize`` values raise an error that is both an
:class:`ExportError` and an :class:`~uniperception.errors.InvalidInputError`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import create_model, is_model
from .errors import InvalidInputError, UniperceptionError
from .layers.reparam import reparameterize

__all__ = ["FORMATS", "INT8_TOLERANCE", "QUANTIZE", "ExportError", "ExportOptionError", "ExportReport", "export"]

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "pt2", "torchscript")
#: values of ``export(quantize=...)`` (``None``: float32)
QUANTIZE = ("int8",)
#: default relative tolerance (max |int8 − float32| / max |float32 logit|) of an int8 export's verification
INT8_TOLERANCE = 0.1
#: the op types an int8 export quantises (see the module docstring for why not ``Conv``)
INT8_OP_TYPES = ("MatMul", "Gemm")


class ExportError(UniperceptionError):
    """An export failed or did not reproduce the eager model."""


class ExportOptionError(ExportError, InvalidInputError):
    """An unknown ``format`` or ``quantize`` value, or a combination that does not exist."""


@dataclass
class ExportReport:
    """Where the export went and how well it matches the eager model."""

    path: Path
    format: str
    max_abs_diff: float
    max_rel_diff: float
    batch_sizes: tuple[int, ...]
    sidecar: Path
    quantize: str | None = None
    tolerance: float = 1e-4
    top1_agreement: float | None = None  # share of the random inputs with the same top-1 class (class logits only)

    def summary(self) -> str:
        """One line for the CLI."""
        if self.quantize is None:
            return (
                f"{self.format} written to {self.path}; verified against eager PyTorch at batch sizes "
                f"{self.batch_sizes}: max |diff| {self.max_abs_diff:.2e}, max relative {self.max_rel_diff:.2e}"
            )
        n = sum(self.batch_sizes)
        return (
            f"{self.format} {self.quantize} (dynamic quantisation) written to {self.path} "
            f"({self.path.stat().st_size / 2**20:.2f} MiB); compared with eager float32 PyTorch on {n} random "
            f"inputs (batch sizes {self.batch_sizes}) with the {self.quantize} tolerance max relative diff ≤ "
            f"{self.tolerance:g} (not 1e-4; quantisation changes the numbers): max |diff| {self.max_abs_diff:.2e}, "
            f"max relative {self.max_rel_diff:.2e}"
            + (f", top-1 agreement {self.top1_agreement:.0%} ({round(self.top1_agreement * n)}/{n})"
               if self.top1_agreement is not None else "")
        )


class _Logits(nn.Module):
    """Wraps a Perceiver or backbone so that export sees ``Tensor -> Tensor``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _nhwc_residual(self: Any, x: Tensor) -> Tensor:
    """``UniRepLKNetBlock.residual`` in the official NHWC form (pointwise layers as Linears: ONNX MatMuls)."""
    y = self.se(self.norm(self.dwconv(x)))
    y = self.pwconv2(self.act(self.pwconv1(y)))  # Permute + Linear, GELU + GRN (NHWC), Linear + Permute [+ BN]
    if self.gamma is not None:
        y = y * self.gamma.view(1, -1, 1, 1)
    return self.drop_path(y)


def _pointwise_as_matmul(model: nn.Module) -> int:
    """Switch every UniRepLKNet block of ``model`` (a private copy) to :func:`_nhwc_residual`; returns how many."""
    from .layers.unireplknet_block import UniRepLKNetBlock

    n = 0
    for m in model.modules():
        if isinstance(m, UniRepLKNetBlock):
            m.residual = types.MethodType(_nhwc_residual, m)  # type: ignore[method-assign]
            n += 1
    return n


def _resolve(target: Any, training_form: bool) -> tuple[nn.Module, tuple[int, ...], dict[str, Any]]:
    from .perceiver import Perceiver

    if isinstance(target, (str, os.PathLike)) and not isinstance(target, Perceiver):
        name = str(target)
        if is_model(name) and not Path(name).exists():
            model: nn.Module = create_model(name)
        else:
            model = Perceiver.from_pretrained(target)
    else:
        model = target
    model = copy.deepcopy(model).eval()
    if not training_form:
        reparameterize(model)
    if isinstance(model, Perceiver):
        example = _example_pieces(model)
        meta = {"kind": "perceiver", **model.get_config()}
    else:
        example = (1, getattr(model, "in_chans", 3), 224, 224)
        meta = {"kind": "backbone", "architecture": type(model).__name__}
    meta["form"] = "training" if training_form else "deploy"
    meta["input_shape"] = ["batch", *example[1:]]
    return model, example, meta


def _example_pieces(p: Any) -> tuple[int, ...]:
    """Shape of one processed piece, from the adapter run on a synthetic raw input of its modality."""
    import numpy as np

    raw: Any
    kw: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    if p.modality == "image":
        raw = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    elif p.modality == "audio":
        raw, kw = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440) * 0.3).astype(np.float32), {"sample_rate": 16000}
    elif p.modality == "video":
        raw = rng.integers(0, 255, (16, 64, 64, 3), dtype=np.uint8)
    elif p.modality == "points":
        raw = rng.normal(size=(2048, 3)).astype(np.float32)
    else:
        import pandas as pd

        n = 4 * int(getattr(p.adapter.config, "lookback", 96)) + 64
        raw = pd.DataFrame({"y": np.sin(np.arange(n) / 7.0)}, index=pd.date_range("2020-01-01", periods=n, freq="h"))
    pieces = p.adapter.preprocess(raw, **kw)
    return (1, *pieces.shape[1:])


def export(
    target: Any,
    out: str | os.PathLike[str],
    format: str = "onnx",
    training_form: bool = False,
    tolerance: float | None = None,
    opset: int = 18,
    quantize: str | None = None,
) -> ExportReport:
    """Export ``target`` (a Perceiver, a bundle name/directory, a backbone module or a registered name).

    The deploy (re-parameterised) form is exported unless ``training_form=True``; the original object is
    never modified. ``quantize="int8"`` (ONNX only) writes a dynamically int8-quantised ONNX file (see the
    module docstring). ``tolerance`` is the largest accepted relative difference from the eager float32 model
    (default 1e-4, or :data:`INT8_TOLERANCE` for int8). Returns an :class:`ExportReport`; raises
    :class:`ExportError` if the export or its verification fails, :class:`ExportOptionError` (also an
    ``InvalidInputError``) for unknown ``format``/``quantize`` values.
    """
    if format not in FORMATS:
        raise ExportOptionError(f"unknown export format {format!r}; choose from {FORMATS}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportOptionError(f"unknown quantize={quantize!r}; choose from {QUANTIZE} or None (float32)")
    if quantize is not None and format != "onnx":
        raise ExportOptionError(f"quantize={quantize!r} needs format='onnx' (onnxruntime quantisation), not {format!r}")
    if tolerance is None:
        tolerance = 1e-4 if quantize is None else INT8_TOLERANCE
    model, shape, meta = _resolve(target, training_form)
    if quantize is not None:
        _pointwise_as_matmul(model)
    wrapped = _Logits(model).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape[1:], generator=gen)
    quant: dict[str, Any] | None = None
    try:
        with torch.no_grad():
            if format == "onnx" and quantize is not None:
                with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                    f32 = Path(tmp) / "float32.onnx"
                    _onnx_export(wrapped, x, f32, opset)
                    quant = _quantize_int8(f32, out)
            elif format == "onnx":
                _onnx_export(wrapped, x, out, opset)
            elif format == "pt2":
                batch = torch.export.Dim("batch", min=1, max=4096)
                ep = torch.export.export(wrapped, (x,), dynamic_shapes={"x": {0: batch}})
                torch.export.save(ep, str(out))
            else:
                traced = torch.jit.trace(wrapped, (x,), check_trace=False)
                traced.save(str(out))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{format} export failed: {type(e).__name__}: {e}") from e
    run = _loader(format, out)
    abs_d, rel_d = 0.0, 0.0
    sizes = (1, 3) if quantize is None else (1, 8)  # more inputs for a meaningful int8 top-1 agreement
    same = total = 0
    with torch.no_grad():
        for b in sizes:
            xb = torch.randn(b, *shape[1:], generator=gen)
            ref = wrapped(xb)
            got = run(xb)
            d = (got - ref).abs().max().item()
            abs_d = max(abs_d, d)
            rel_d = max(rel_d, d / max(ref.abs().max().item(), 1e-12))
            if ref.ndim == 2:
                same += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += b
    agree = same / total if total else None
    what = format if quantize is None else f"{format} {quantize}"
    if not rel_d <= tolerance:
        raise ExportError(f"{what} export does not reproduce the eager model: max relative diff {rel_d:.2e} > {tolerance}")
    sidecar = out.with_name(out.name + ".json")
    verification = {"reference": "eager float32 PyTorch, random normal inputs", "max_abs_diff": abs_d,
                    "max_rel_diff": rel_d, "tolerance": tolerance, "top1_agreement": agree, "batch_sizes": sizes}
    meta.update({"format": format, "quantization": quant, "verification": verification})
    sidecar.write_text(json.dumps(meta, indent=2, default=list) + "\n")
    report = ExportReport(out, format, abs_d, rel_d, sizes, sidecar, quantize, tolerance, agree)
    logger.info(report.summary())
    return report


def _onnx_export(wrapped: nn.Module, x: Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        wrapped, (x,), str(path), input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset, dynamo=False,
    )


def _cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI); False when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(v in flags.split() for v in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8 quantisation of the float32 ONNX file ``src`` into ``dst``; returns what the sidecar records."""
    try:
        import onnx
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ExportError("int8 quantisation needs onnx and onnxruntime: pip install 'uniperception[export]'") from e
    graph = onnx.load(str(src), load_external_data=False).graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    candidates = [n for n in graph.node if n.op_type in INT8_OP_TYPES]
    # a MatMul of two activations (e.g. GRN's ones @ x² reduction) has no weight to quantise: keep it float32
    skip = [n.name for n in candidates if len(n.input) < 2 or n.input[1] not in consts]
    # quantize_dynamic logs advice through the root logger (``logging.warning``, which would also install a
    # stderr handler on an unconfigured root): silence it for the call, leave the root logger as it was
    root = logging.getLogger()
    level, quiet = root.level, logging.NullHandler()
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    # without VNNI, onnxruntime's u8×s8 kernels multiply-add pairs into saturating int16 (vpmaddubsw):
    # 7-bit weights avoid the overflow, as onnxruntime advises for non-VNNI CPUs (on an AVX2-only EPYC the
    # 8-bit file's largest logit error was 10% of the largest logit)
    reduce_range = not _cpu_has_vnni()
    try:
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
            op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=skip,
        )
    finally:
        root.setLevel(level)
        root.removeHandler(quiet)
    done = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(str(dst)).graph.node)
    return {
        "dtype": "int8",
        "method": "dynamic",
        "tool": f"onnxruntime {onnxruntime.__version__} quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "per_channel": True,
        "weight_bits": 7 if reduce_range else 8,
        "activations": "uint8, quantised at run time (DynamicQuantizeLinear)",
        "op_types": list(INT8_OP_TYPES),
        "quantized_nodes": done,
        "float_nodes_kept": {"MatMul/Gemm without a constant weight": len(skip),
                             "Conv": sum(n.op_type == "Conv" for n in graph.node)},
        "pointwise_layers": "UniRepLKNet 1x1 layers exported as NHWC MatMuls so that they are quantised",
        "float32_size_bytes": src.stat().st_size,
        "size_bytes": dst.stat().st_size,
    }


def _loader(format: str, path: Path):
    if format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError("verifying ONNX needs onnxruntime: pip install 'uniperception[export]'") from e
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    if format == "pt2":
        mod = torch.export.load(str(path)).module()
        return lambda x: mod(x)
    mod = torch.jit.load(str(path))
    return lambda x: mod(x)
