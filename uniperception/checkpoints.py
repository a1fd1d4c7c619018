"""Reading, converting and writing checkpoints, official ones included.

Official UniRepLKNet checkpoints load by key in either form (training / deploy), from ``.pth`` (read with
``torch.load(weights_only=True)``: nothing but tensors and plain containers is ever unpickled),
``.safetensors`` or an in-memory dict, wrapped (``model`` / ``state_dict`` / ``module`` / ``model_ema``) or
bare, with ``module.`` / ``backbone.`` prefixes. Conversions (older deploy layout, a small-kernel conv bias,
deploy checkpoint into a training-form model and the reverse) happen in one converter per architecture and
are listed in the returned :class:`LoadReport`. Any remaining mismatch raises one :class:`CheckpointError`
listing every missing/unexpected/mis-shaped key.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .backbones.registry import PretrainedCfg
from .backbones.unireplknet import UniRepLKNet
from .errors import CheckpointError

__all__ = [
    "DIGEST_KEY",
    "LoadReport",
    "load_official",
    "load_pretrained",
    "read_checkpoint",
    "register_converter",
    "resolve_pretrained_file",
    "save_state_dict",
    "tensor_digest",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_ema")
_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass
class LoadReport:
    """What :func:`load_official` did: keys it could not match and conversions it applied."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key matched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """A multi-line human-readable account (what the CLI prints)."""
        lines = []
        for title, items in (
            ("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.mismatched),
            ("converted", self.converted), ("skipped", self.skipped),
        ):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"{title} ({len(items)}):\n  " + "\n  ".join(shown))
        return "\n".join(lines) or "all keys matched"


# ------------------------------------------------------------------------------------------------ reading
#: safetensors metadata key holding :func:`tensor_digest` of the file's tensors (written by :func:`save_state_dict`)
DIGEST_KEY = "uniperception.sha256"


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order): a checksum of the content."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Read a checkpoint file safely: safetensors, or a pickle restricted to tensors and containers.

    ``argparse.Namespace`` is allowed because official RepLKNet/SLaK files carry one; anything else that a
    pickle would need to import (a class, a function) is refused without being executed.

    A safetensors file written by :func:`save_state_dict` carries a SHA-256 digest of its tensors, checked
    here: a flipped bit anywhere in its data is an error instead of silently different weights.

    Raises:
        CheckpointError: missing, empty, truncated, corrupt or unsafe file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {p}")
    with open(p, "rb") as fh:
        head = fh.read(8)
    is_zip = head[:4] == b"PK\x03\x04"
    is_pickle = head[:1] == b"\x80"
    if p.suffix == ".safetensors" or not (is_zip or is_pickle):
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(p))
            with safe_open(str(p), "pt") as fh:
                metadata = fh.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {p} as safetensors (truncated or corrupt?): {e}") from e
        expected = metadata.get(DIGEST_KEY)
        if expected is not None and expected != tensor_digest(tensors):
            raise CheckpointError(
                f"{p} is corrupt: its tensors do not match the SHA-256 digest stored when it was written "
                "(a damaged copy or disk error); re-download or re-export it"
            )
        return tensors
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {p}: it needs to unpickle objects other than tensors ({e}). "
            "Only load files you trust by other means, or convert them to safetensors."
        ) from e
    except Exception as e:  # a corrupt pickle stream can fail in many ways (IndexError, KeyError, struct.error…)
        raise CheckpointError(
            f"cannot read checkpoint {p} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and any(isinstance(v, Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any) -> tuple[StateDict, list[str]]:
    """Find the state dict inside a checkpoint object and strip wrapper prefixes.

    Tries ``model``, ``state_dict``, ``module``, ``model_ema`` then the object itself. Returns
    ``(state_dict, notes)`` where notes say which wrapper/prefix was removed.
    """
    notes: list[str] = []
    sd: Any = obj
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                sd = obj[key]
                notes.append(f"unwrapped '{key}'")
                break
    if not _is_state_dict(sd):
        raise CheckpointError(
            "no state dict found in checkpoint (expected a dict of tensors, possibly under "
            f"{', '.join(repr(k) for k in _WRAPPER_KEYS)})"
        )
    out = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in out):
            dropped = [k for k in out if not k.startswith(prefix)]
            out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
            notes.append(f"stripped prefix '{prefix}'" + (f" (ignored {len(dropped)} other keys)" if dropped else ""))
    return out, notes


# ------------------------------------------------------------------------------------------------ converters
@dataclass
class Conversion:
    """What a converter hands back to :func:`load_official`.

    ``expected`` is the key → shape table the model will have once ``prepare`` ran (``None``: the model's
    current one); ``prepare`` changes the model (e.g. re-parameterises it) and runs only after the checkpoint
    passed the key check, so a failed load leaves the model untouched.
    """

    state_dict: StateDict
    expected: dict[str, tuple[int, ...]] | None = None
    prepare: Callable[[], Any] | None = None


Converter = Callable[[StateDict, nn.Module, "LoadReport", bool, bool], Conversion]
_CONVERTERS: dict[type[nn.Module], Converter] = {}


def register_converter(cls: type[nn.Module]) -> Callable[[Converter], Converter]:
    """Register the function that turns an official state dict into one ``cls`` loads by key.

    An architecture may instead define a static method ``convert_official_state_dict(sd, model, report,
    adapt_head, strict) -> Conversion`` on its class (keeps the conversion in the architecture's file).
    """

    def wrap(fn: Converter) -> Converter:
        _CONVERTERS[cls] = fn
        return fn

    return wrap


def _is_training_form_unireplknet(sd: StateDict) -> bool | None:
    train = any(k.endswith("pwconv2.2.running_mean") for k in sd)
    deploy = any(k.endswith("pwconv2.0.bias") for k in sd)
    if train == deploy:
        return None  # no blocks (or inconsistent): nothing to decide
    return train


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@register_converter(UniRepLKNet)
def convert_unireplknet(
    sd: StateDict, model: nn.Module, report: LoadReport, adapt_head: bool, strict: bool
) -> Conversion:
    """Official UniRepLKNet state dict → keys of ``model`` (see the module docstring for what converts)."""
    assert isinstance(model, UniRepLKNet)
    sd = dict(sd)
    own = model.state_dict()
    # the pre-2023-12-01 deploy layout kept large-kernel convs at dwconv.weight/bias
    for k in [k for k in sd if k.endswith((".dwconv.weight", ".dwconv.bias"))]:
        new = k.replace(".dwconv.", ".dwconv.lk_origin.")
        if k not in own and new.rsplit(".", 1)[0] + ".weight" in own:
            sd[new] = sd.pop(k)
            report.converted.append(f"{k} -> {new}")
    # a training-form small-kernel conv with a bias (briefly in the official code): fold it into its BN
    for k in [k for k in sd if k.endswith(".dwconv.bias")]:
        rm = k.replace(".dwconv.bias", ".norm.running_mean")
        if rm in sd:
            sd[rm] = sd[rm] - sd.pop(k)
            report.converted.append(f"{k} folded into {rm}")
    if model.features_only:
        for k in [k for k in sd if k.startswith(("norm.", "head."))]:
            del sd[k]
            report.skipped.append(f"{k} (classification layer; features_only model)")
        for i in range(4):
            for suffix in ("weight", "bias"):
                key = f"norm{i}.{suffix}"
                if i not in model.out_indices:
                    if sd.pop(key, None) is not None:
                        report.skipped.append(f"{key} (stage {i} not in out_indices)")
                elif key not in sd:  # official features mode keeps norm0..3 at 1/0 when absent
                    sd[key] = own[key].detach().clone()
                    report.converted.append(f"{key} absent: kept its initial value (official behaviour)")
    elif adapt_head and "head.weight" in sd:
        head = own.get("head.weight")
        if head is None or tuple(head.shape) != tuple(sd["head.weight"].shape):
            for k in ("head.weight", "head.bias"):
                if sd.pop(k, None) is not None:
                    report.skipped.append(f"{k} (head size differs; model head kept freshly initialised)")
                if k in own:
                    sd[k] = own[k].detach().clone()
    ckpt_train = _is_training_form_unireplknet(sd)
    model_train = not model.is_deploy
    if ckpt_train is False and model_train:
        with torch.device("meta"):
            twin = UniRepLKNet(**{**model.init_kwargs, "deploy": True})
        report.converted.append("checkpoint is deploy form: model re-parameterised before loading")
        return Conversion(sd, expected=_shapes(twin), prepare=model.reparameterize)
    if ckpt_train is True and not model_train:
        ref = next(model.parameters())
        twin = UniRepLKNet(**{**model.init_kwargs, "deploy": False}).to(device=ref.device, dtype=ref.dtype)
        load_official(twin, sd, strict=strict, adapt_head=False, _report=report)
        twin.reparameterize()
        report.converted.append("checkpoint is training form: re-parameterised into the deploy model")
        return Conversion(dict(twin.state_dict()))
    return Conversion(sd)


def _find_converter(model: nn.Module) -> Converter | None:
    """The converter registered for ``model``'s class, or its ``convert_official_state_dict`` static method."""
    for cls, conv in _CONVERTERS.items():
        if isinstance(model, cls):
            return conv
    own = getattr(type(model), "convert_official_state_dict", None)
    return own if callable(own) else None


# ------------------------------------------------------------------------------------------------ loading
def load_official(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    adapt_head: bool = False,
    _report: LoadReport | None = None,
) -> LoadReport:
    """Load an official checkpoint (file or dict) into ``model`` in place.

    Args:
        model: a backbone of this package (any family with a registered converter) or any module.
        path_or_state_dict: ``.pth``/``.safetensors`` path, or an already loaded (possibly wrapped) dict.
        strict: raise :class:`CheckpointError` if any key is missing, unexpected or mis-shaped.
        adapt_head: allow a classifier of another size (e.g. a 21841-class ImageNet-22K head) by skipping it;
            the model keeps its own freshly initialised head. Off by default: a head mismatch is an error.

    Returns:
        A :class:`LoadReport` of what was converted, skipped or left unmatched.
    """
    report = _report if _report is not None else LoadReport()
    obj = read_checkpoint(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else path_or_state_dict
    sd, notes = unwrap_state_dict(obj)
    report.converted.extend(notes)
    conversion = Conversion(sd)
    converter = _find_converter(model)
    if converter is not None:
        conversion = converter(sd, model, report, adapt_head, strict)
    sd = conversion.state_dict
    target = conversion.expected if conversion.expected is not None else _shapes(model)
    for k, v in sd.items():
        if k not in target:
            report.unexpected.append(k)
        elif tuple(v.shape) != target[k]:
            report.mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {target[k]}")
    report.missing.extend(k for k in target if k not in sd)
    if strict and not report.ok:
        hint = ""
        if any(m.startswith("head.") for m in report.mismatched):
            hint = " The classifier size differs: pass adapt_head=True (or build the model with that num_classes)."
        raise CheckpointError(f"checkpoint does not match {type(model).__name__}:\n{report.summary()}{hint}")
    if conversion.prepare is not None:
        conversion.prepare()
    bad = {m.split(":")[0] for m in report.mismatched}
    loadable = {k: v for k, v in sd.items() if k in target and k not in bad}
    model.load_state_dict(loadable, strict=False)
    logger.info("loaded checkpoint into %s: %s", type(model).__name__, report.summary().replace("\n", "; "))
    return report


def resolve_pretrained_file(cfg: PretrainedCfg, pretrained: bool | str | os.PathLike[str]) -> Path:
    """Find the weight file of ``cfg``: a local file, a directory holding it, or the hub cache.

    The hub route uses ``huggingface_hub`` and honours ``HF_HUB_OFFLINE`` / ``HF_HOME`` / ``HF_HUB_CACHE``.
    """
    if pretrained is True:
        if not cfg.hf_hub_id:
            raise CheckpointError(f"no hub location is known for {cfg.filename}; pass a local path")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise CheckpointError("huggingface_hub is needed to fetch weights: pip install huggingface_hub") from e
        try:
            return Path(hf_hub_download(cfg.hf_hub_id, cfg.filename))
        except Exception as e:  # hub errors are many; all mean "not available here"
            raise CheckpointError(
                f"could not get {cfg.filename} from the hub repo {cfg.hf_hub_id} ({type(e).__name__}: {e}). "
                "Download it where a network exists and pass its path (or directory) as pretrained=..."
            ) from e
    p = Path(pretrained)  # type: ignore[arg-type]
    if p.is_dir():
        exact = p / cfg.filename
        if exact.is_file():
            return exact
        found = sorted(q for q in p.iterdir() if q.suffix in _SUFFIXES and q.is_file())
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"directory {p} does not hold {cfg.filename}"
            + (f" and has several candidates ({', '.join(q.name for q in found)})" if found else "")
        )
    if not p.is_file():
        raise CheckpointError(f"pretrained weights not found: {p}")
    return p


def load_pretrained(
    model: nn.Module, cfg: PretrainedCfg, pretrained: bool | str | os.PathLike[str], name: str = ""
) -> LoadReport:
    """Load the weights described by ``cfg`` (see :func:`resolve_pretrained_file`) into ``model``."""
    path = resolve_pretrained_file(cfg, pretrained)
    num_classes = getattr(model, "num_classes", cfg.num_classes)
    adapt = not getattr(model, "features_only", False) and num_classes != cfg.num_classes
    logger.info("loading %s weights %s from %s", name, cfg.tag, path)
    return load_official(model, path, adapt_head=adapt)


# ------------------------------------------------------------------------------------------------ writing
def save_state_dict(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write a state dict atomically (temp file in the same directory, fsync, then rename).

    ``.safetensors`` paths use safetensors (shared tensors are cloned) and store a SHA-256 digest of the tensors
    in the metadata (:data:`DIGEST_KEY`, checked by :func:`read_checkpoint`); anything else ``torch.save``.
    A crash or kill mid-write leaves any previous file at ``path`` intact.

    Raises:
        CheckpointError: the file cannot be written (disk full, read-only directory, …); the previous file,
            if any, is unchanged and no temporary file is left behind.
    """
    from safetensors import SafetensorError

    p = Path(path)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.close(fd)
        tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={**(metadata or {}), DIGEST_KEY: tensor_digest(tensors)})
        else:
            torch.save(tensors, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a saved model is an ordinary file
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except (OSError, RuntimeError, SafetensorError) as e:  # how a full disk surfaces (torch.save: RuntimeError)
        _release_frames(e)
        raise CheckpointError(
            f"could not write {p}: {e}. The previous file (if any) is unchanged; "
            "check free disk space and that the directory is writable."
        ) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return p


def _release_frames(e: BaseException | None) -> None:
    """Drop the locals of a failed ``torch.save`` and of the errors it chained: its writer holds the temp file
    open (and its disk space taken) for as long as a traceback keeps it alive."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__context__


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
