"""Export the re-parameterised network (adapter embedding + backbone + head) and verify it on the spot.

Formats: ``onnx`` (checked with onnxruntime), ``pt2`` (``torch.export``, reloaded with ``torch.export.load``)
and ``torchscript`` (``torch.jit.trace``; deprecated in recent PyTorch, kept for older runtimes). The
processor stays in Python: its settings and the label names are written to ``<out>.json`` beside the file.
Every export is reloaded and compared with the eager model on random inputs (two batch sizes, so the
dynamic batch axis is exercised); a relative error above ``tolerance`` raises :class:`ExportError`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import create_model, is_model
from .errors import UniperceptionError
from .layers.reparam import reparameterize

__all__ = ["FORMATS", "ExportError", "ExportReport", "export"]

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "pt2", "torchscript")


class ExportError(UniperceptionError):
    """An export failed or did not reproduce the eager model."""


@dataclass
class ExportReport:
    """Where the export went and how well it matches the eager model."""

    path: Path
    format: str
    max_abs_diff: float
    max_rel_diff: float
    batch_sizes: tuple[int, ...]
    sidecar: Path

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"{self.format} written to {self.path}; verified against eager PyTorch at batch sizes "
            f"{self.batch_sizes}: max |diff| {self.max_abs_diff:.2e}, max relative {self.max_rel_diff:.2e}"
        )


class _Logits(nn.Module):
    """Wraps a Perceiver or backbone so that export sees ``Tensor -> Tensor``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


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
    tolerance: float = 1e-4,
    opset: int = 18,
) -> ExportReport:
    """Export ``target`` (a Perceiver, a bundle name/directory, a backbone module or a registered name).

    The deploy (re-parameterised) form is exported unless ``training_form=True``; the original object is
    never modified. Returns an :class:`ExportReport`; raises :class:`ExportError` if verification fails.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {FORMATS}")
    model, shape, meta = _resolve(target, training_form)
    wrapped = _Logits(model).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape[1:], generator=gen)
    try:
        with torch.no_grad():
            if format == "onnx":
                torch.onnx.export(
                    wrapped, (x,), str(out), input_names=["input"], output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset, dynamo=False,
                )
            elif format == "pt2":
                batch = torch.export.Dim("batch", min=1, max=4096)
                ep = torch.export.export(wrapped, (x,), dynamic_shapes={"x": {0: batch}})
                torch.export.save(ep, str(out))
            else:
                traced = torch.jit.trace(wrapped, (x,), check_trace=False)
                traced.save(str(out))
    except Exception as e:
        raise ExportError(f"{format} export failed: {type(e).__name__}: {e}") from e
    run = _loader(format, out)
    abs_d, rel_d, sizes = 0.0, 0.0, (1, 3)
    with torch.no_grad():
        for b in sizes:
            xb = torch.randn(b, *shape[1:], generator=gen)
            ref = wrapped(xb)
            got = run(xb)
            d = (got - ref).abs().max().item()
            abs_d = max(abs_d, d)
            rel_d = max(rel_d, d / max(ref.abs().max().item(), 1e-12))
    if not rel_d <= tolerance:
        raise ExportError(f"{format} export does not reproduce the eager model: max relative diff {rel_d:.2e} > {tolerance}")
    sidecar = out.with_name(out.name + ".json")
    meta.update({"format": format, "verification": {"max_abs_diff": abs_d, "max_rel_diff": rel_d, "batch_sizes": sizes}})
    sidecar.write_text(json.dumps(meta, indent=2, default=list) + "\n")
    report = ExportReport(out, format, abs_d, rel_d, sizes, sidecar)
    logger.info(report.summary())
    return report


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
