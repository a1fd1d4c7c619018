"""The user's front door: adapter → backbone → head behind one object, saved and loaded as a bundle.

``Perceiver.from_pretrained(name_or_dir)`` resolves, in order: a local bundle directory, a bundle shipped
inside the package (``uniperception/bundles/<name>``), an official ImageNet checkpoint (``"unireplknet_a.in1k"``,
or a ``.pth``/``.safetensors`` file of one), then a Hugging Face hub repo id (``huggingface_hub``, honouring
offline mode). A bundle is a directory with ``config.json`` (backbone, adapter and head configs, label names,
package version), ``model.safetensors`` and a ``README.md`` model card; loading never unpickles.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .adapters import ModalityAdapter, build_adapter
from .adapters.base import MODALITIES
from .backbones import create_model, get_pretrained_cfg, is_model
from .checkpoints import save_state_dict
from .errors import CheckpointError, InvalidInputError, ModalityMismatchError
from .heads import ClassificationHead, ClassificationHeadConfig, ForecastHead, ForecastHeadConfig

__all__ = ["BUNDLE_DIR", "Perceiver", "Prediction", "list_bundles"]

logger = logging.getLogger(__name__)

#: where bundles shipped with the package live
BUNDLE_DIR = Path(__file__).parent / "bundles"

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


def list_bundles() -> list[str]:
    """Names of the pretrained bundles that ship with the package (``Perceiver.from_pretrained(name)``)."""
    return sorted(p.name for p in BUNDLE_DIR.glob("*") if (p / CONFIG_NAME).is_file())


FORMAT_VERSION = 1
_MODE_LOCK = threading.RLock()  # serialises the eval copies made for inference on a model in training mode


@dataclass(frozen=True)
class Prediction:
    """One scored label."""

    label: str
    score: float
    index: int


def imagenet_labels(num_classes: int) -> list[str]:
    """ImageNet-1K class names (shipped with torchvision, offline); generic names for other sizes."""
    if num_classes == 1000:
        from torchvision.models import ResNet50_Weights

        return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    return [f"class_{i}" for i in range(num_classes)]


class Perceiver(nn.Module):
    """Adapter + backbone + head for one modality and task.

    Args:
        modality: ``"audio" "video" "points" "image" "series"``.
        backbone: a registered backbone name (built with the adapter's ``out_channels`` as ``in_chans``).
        labels: class names (their count sets the head size).
        adapter: an adapter instance, or a dict of adapter configuration fields (default: the modality's defaults).
        head: a :class:`ClassificationHeadConfig` or dict of its fields (``in_features``/``num_classes``/``views``
            are filled in).
        backbone_kwargs: extra backbone constructor arguments (``drop_path_rate``, ``kernel_sizes``, ``deploy``, …).
    """

    _reparameterize_walks_children = True

    def __init__(
        self,
        modality: str,
        backbone: str = "unireplknet_a",
        labels: Sequence[str] = (),
        adapter: ModalityAdapter | dict[str, Any] | None = None,
        head: ClassificationHeadConfig | dict[str, Any] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        task: str = "classification",
        horizon: int | None = None,
    ) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise InvalidInputError(f"unknown modality {modality!r}; choose from {MODALITIES}")
        if task not in ("classification", "forecasting"):
            raise InvalidInputError(f"task must be 'classification' or 'forecasting', got {task!r}")
        if task == "forecasting" and (modality != "series" or not horizon or horizon < 1):
            raise InvalidInputError("forecasting needs modality='series' and a positive horizon")
        self.task = task
        self.horizon = horizon if task == "forecasting" else None
        if not labels:
            raise InvalidInputError(
                "a Perceiver needs its label names (labels=[...]; for forecasting: the variable names)"
            )
        if len(set(labels)) != len(labels):
            raise InvalidInputError("label names must be unique")
        self.modality = modality
        self.labels = [str(x) for x in labels]
        if isinstance(adapter, ModalityAdapter):
            if adapter.modality != modality:
                raise ModalityMismatchError(f"adapter is for {adapter.modality!r}, not {modality!r}")
            self.adapter = adapter
        else:
            fields = {k: v for k, v in (adapter or {}).items() if k != "modality"}
            if (adapter or {}).get("modality", modality) != modality:
                raise ModalityMismatchError(f"adapter config is for {adapter['modality']!r}, not {modality!r}")  # type: ignore[index]
            self.adapter = build_adapter(modality, **fields)
        self.backbone_name = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        for k in ("in_chans", "num_classes", "pretrained", "features_only"):
            if k in self.backbone_kwargs:
                raise InvalidInputError(f"backbone_kwargs may not set {k!r}: the Perceiver sets it")
        self.backbone = create_model(backbone, in_chans=self.adapter.out_channels, num_classes=0, **self.backbone_kwargs)
        self.backbone.remove_head()  # type: ignore[operator]
        head_fields = dict(head) if isinstance(head, dict) else (dataclasses.asdict(head) if head else {})
        self.head: ClassificationHead | ForecastHead
        if task == "forecasting":
            cfg = self.adapter.config
            if getattr(cfg, "num_variables", len(self.labels)) != len(self.labels):
                raise InvalidInputError(f"{len(self.labels)} variable names for {cfg.num_variables} variables")
            head_fields.update(in_features=self.backbone.num_features, horizon=horizon,
                               num_variables=len(self.labels), lookback=cfg.lookback)
            self.head = ForecastHead(ForecastHeadConfig(**head_fields))
        else:
            head_fields.update(
                in_features=self.backbone.num_features, num_classes=len(self.labels), views=self.adapter.views
            )
            self.head = ClassificationHead(ClassificationHeadConfig(**head_fields))
        self.eval()

    # ------------------------------------------------------------------------------------------ model
    def forward(self, batch: Tensor) -> Tensor:
        """Processed pieces ``[B, ...]`` → logits ``[B, num_classes]`` (forecasting: ``[B, horizon, N]``)."""
        maps = self.backbone.forward_features(self.adapter(batch))
        if isinstance(self.head, ForecastHead):
            return self.head(maps, batch)
        return self.head(maps)

    def features(self, batch: Tensor) -> Tensor:
        """Processed pieces → the normalised pooled features the head sees ``[B, width]``."""
        maps = self.backbone.forward_features(self.adapter(batch))
        if isinstance(self.head, ForecastHead):
            return self.head.norm(maps.mean((-2, -1)))
        return self.head.pre_logits(maps)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The head's training loss (what :class:`uniperception.training.Trainer` minimises)."""
        return self.head.loss(logits, target)

    def metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        """The head's metrics (accuracy…)."""
        return self.head.metrics(logits, target)

    def reparameterize(self) -> Perceiver:
        """Convert the backbone to its deploy form in place (same outputs, faster)."""
        from .layers.reparam import reparameterize

        reparameterize(self)
        return self

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------------------ inference
    def _pieces(self, inputs: list[Any], kwargs: dict[str, Any]) -> tuple[Tensor, list[int]]:
        processed = [self.adapter.preprocess(x, **kwargs) for x in inputs]
        counts = [int(p.shape[0]) for p in processed]
        return torch.cat(processed).to(self.device), counts

    @torch.inference_mode()
    def _scores(self, inputs: list[Any], kwargs: dict[str, Any], batch_size: int = 32) -> list[Tensor]:
        batch, counts = self._pieces(inputs, kwargs)
        # inference never switches this module's mode (another thread may be using it): a model left in training
        # mode (e.g. right after Trainer.fit) is scored through an eval-mode copy instead
        net = self
        if self.training:
            with _MODE_LOCK:  # deepcopy while another caller copies is fine; serialise anyway to bound memory
                net = copy.deepcopy(self).eval()
        probs = torch.cat([net.head.probabilities(net(b)) for b in batch.split(batch_size)])
        out, start = [], 0
        for n in counts:  # pieces of one input (sliding windows, clips) are pooled by mean probability
            out.append(probs[start : start + n].mean(0).float().cpu())
            start += n
        return out

    def _top(self, scores: Tensor, top_k: int) -> list[Prediction]:
        k = max(1, min(int(top_k), len(self.labels)))
        vals, idx = scores.topk(k)
        return [Prediction(self.labels[i], float(v), int(i)) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]

    def classify(self, x: Any, top_k: int = 5, **kwargs: Any) -> list[Prediction] | list[list[Prediction]]:
        """Classify one input (→ ``list[Prediction]``) or a list of inputs (→ one list per input).

        Extra keyword arguments go to the adapter's processor (e.g. ``sample_rate=`` for raw audio arrays).
        """
        if self.task != "classification":
            raise InvalidInputError("this is a forecasting model: use forecast(df, horizon)")
        single = not isinstance(x, (list, tuple))
        inputs = [x] if single else list(x)
        if not inputs:
            raise InvalidInputError("nothing to classify: the input list is empty")
        preds = [self._top(s, top_k) for s in self._scores(inputs, kwargs)]
        return preds[0] if single else preds

    def _check_modality(self, modality: str) -> None:
        if modality != self.modality:
            raise ModalityMismatchError(
                f"this model classifies {self.modality!r} inputs, not {modality!r}; "
                f"use classify_{self.modality}() or load a {modality} bundle"
            )

    def classify_audio(self, x: Any, top_k: int = 5, sample_rate: int | None = None) -> Any:
        """Audio file(s) or waveform(s) (arrays need ``sample_rate``) → predictions."""
        self._check_modality("audio")
        kw = {} if sample_rate is None else {"sample_rate": sample_rate}
        return self.classify(x, top_k, **kw)

    def classify_video(self, x: Any, top_k: int = 5) -> Any:
        """Video file(s) or ``T×H×W×3`` uint8 frame array(s) → predictions."""
        self._check_modality("video")
        return self.classify(x, top_k)

    def classify_points(self, x: Any, top_k: int = 5) -> Any:
        """Point-cloud file(s), ``N×3`` array(s) or Open3D clouds → predictions."""
        self._check_modality("points")
        return self.classify(x, top_k)

    def classify_image(self, x: Any, top_k: int = 5) -> Any:
        """Image file(s), PIL images, arrays or tensors → predictions."""
        self._check_modality("image")
        return self.classify(x, top_k)

    def classify_series(self, x: Any, top_k: int = 5) -> Any:
        """Time series (UCR/UEA-style classification) → predictions."""
        self._check_modality("series")
        return self.classify(x, top_k)

    @torch.inference_mode()
    def forecast(self, df: Any, horizon: int | None = None) -> Any:
        """Forecast the ``horizon`` steps after the end of ``df`` (a DataFrame indexed by time).

        Returns a DataFrame indexed by the future timestamps, one column per variable. A horizon longer than
        the trained head raises ``InvalidInputError``; a shorter one is a truncation.
        """
        import pandas as pd

        from .adapters.series import denormalize

        if self.task != "forecasting":
            raise ModalityMismatchError(f"this model classifies {self.modality!r} inputs; it does not forecast")
        h = self.horizon if horizon is None else int(horizon)
        if h < 1 or h > self.horizon:  # type: ignore[operator]
            raise InvalidInputError(f"horizon must be between 1 and the trained horizon {self.horizon}, got {h}")
        was = self.training
        self.eval()
        window, stats = self.adapter.preprocess(df, return_stats=True)
        pred = self(window[-1:].to(self.device)).cpu()
        self.train(was)
        values = denormalize(pred, type(stats)(stats.mean[-1:], stats.std[-1:]))[0, :h].numpy()
        index = future_index(df, h)
        return pd.DataFrame(values, index=index, columns=self.labels)

    @torch.inference_mode()
    def embed(self, x: Any, **kwargs: Any) -> Tensor:
        """Feature vector(s) for retrieval: ``[width]`` for one input, ``[N, width]`` for a list."""
        single = not isinstance(x, (list, tuple))
        inputs = [x] if single else list(x)
        batch, counts = self._pieces(inputs, kwargs)
        feats = self.features(batch)
        pooled = torch.stack([f.mean(0) for f in feats.split(counts)]).cpu()
        return pooled[0] if single else pooled

    # ------------------------------------------------------------------------------------------ bundles
    def get_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this Perceiver (saved as ``config.json``)."""
        kwargs = dict(self.backbone_kwargs)
        kwargs["deploy"] = bool(getattr(self.backbone, "is_deploy", False))
        return {
            "format_version": FORMAT_VERSION,
            "uniperception_version": __version__,
            "task": self.task,
            "horizon": self.horizon,
            "modality": self.modality,
            "labels": self.labels,
            "backbone": {"name": self.backbone_name, "kwargs": kwargs},
            "adapter": self.adapter.get_config(),
            "head": dataclasses.asdict(self.head.config),
        }

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        card: dict[str, Any] | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` (atomically) and a ``README.md`` model card.

        ``dtype="float16"`` (or ``"bfloat16"``) stores floating-point tensors at half precision, halving the file;
        loading casts them back to the model's float32 parameters.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = self.get_config()
        state = self.state_dict()
        if dtype is not None:
            target = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if not isinstance(target, torch.dtype) or not target.is_floating_point:
                raise InvalidInputError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
            state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
            config["weights_dtype"] = str(target).removeprefix("torch.")
        if card:
            config["card"] = card
        save_state_dict(state, d / WEIGHTS_NAME, metadata={"format": "pt", "modality": self.modality})
        _atomic_write_text(d / CONFIG_NAME, json.dumps(config, indent=2, default=list) + "\n")
        _atomic_write_text(d / CARD_NAME, _model_card(config))
        return d

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Perceiver:
        """Build (untrained) from a ``config.json`` dict."""
        try:
            task = config.get("task", "classification")
            if task not in ("classification", "forecasting"):
                raise CheckpointError(f"unsupported task {task!r} for a Perceiver")
            derived = ("in_features", "num_classes", "views", "horizon", "num_variables", "lookback")
            head = {k: v for k, v in config["head"].items() if k not in derived}
            return cls(
                config["modality"],
                backbone=config["backbone"]["name"],
                labels=config["labels"],
                adapter=config["adapter"],
                head=head,
                backbone_kwargs=config["backbone"].get("kwargs", {}),
                task=task,
                horizon=config.get("horizon"),
            )
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"invalid bundle config (missing or malformed field {e})") from e

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **kwargs: Any) -> Perceiver:
        """Load a bundle (directory, shipped name, hub id) or an official ImageNet checkpoint (see module doc)."""
        path = Path(name_or_path)
        if path.is_dir():
            return cls._load_bundle(path)
        name = str(name_or_path)
        shipped = BUNDLE_DIR / name
        if (shipped / CONFIG_NAME).is_file():
            return cls._load_bundle(shipped)
        if path.is_file():
            return cls.from_official(kwargs.pop("backbone", None) or _variant_from_filename(path.name), path, **kwargs)
        if is_model(name):
            return cls.from_official(name, True, **kwargs)
        if "/" in name:
            return cls._load_bundle(_hub_snapshot(name))
        available = list_bundles()
        raise CheckpointError(
            f"no bundle {name!r}: not a directory, not a shipped bundle ({', '.join(available) or 'none'}), "
            "not a registered model name and not a hub id (org/name)"
        )

    @classmethod
    def _load_bundle(cls, directory: Path) -> Perceiver:
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise CheckpointError(f"{directory} is not a bundle: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
        model = cls.from_config(config)
        from .checkpoints import read_checkpoint

        sd = read_checkpoint(w_path)
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        mismatched = [
            f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"bundle {directory} does not match its config: missing {missing[:10]}, unexpected "
                f"{unexpected[:10]}, shape mismatches {mismatched[:10]}"
            )
        model.load_state_dict(sd)
        model.eval()
        return model

    @classmethod
    def from_official(
        cls, backbone: str, weights: bool | str | os.PathLike[str] = True, labels: Sequence[str] | None = None
    ) -> Perceiver:
        """An image classifier from an official ImageNet checkpoint (hub cache, a file or a directory)."""
        if weights is not True and Path(weights).is_file():  # type: ignore[arg-type]
            from .checkpoints import load_official

            num = _num_classes_in(Path(weights))  # type: ignore[arg-type]
            model = create_model(backbone, num_classes=num)
            load_official(model, weights)  # type: ignore[arg-type]
        else:
            model = create_model(backbone, pretrained=weights)
        cfg = getattr(model, "pretrained_cfg", None) or get_pretrained_cfg(backbone)
        n = model.num_classes
        adapter = {"size": cfg.input_size[-1], "crop_pct": cfg.crop_pct, "mean": cfg.mean, "std": cfg.std}
        base = backbone.split(".")[0]
        p = cls("image", backbone=base, labels=labels or imagenet_labels(n), adapter=adapter)
        sd = model.state_dict()
        head_sd = {"norm.weight": sd.pop("norm.weight"), "norm.bias": sd.pop("norm.bias"),
                   "fc.weight": sd.pop("head.weight"), "fc.bias": sd.pop("head.bias")}
        if model.is_deploy:
            p.backbone.reparameterize()
        p.backbone.load_state_dict(sd, strict=True)
        p.head.load_state_dict(head_sd, strict=True)
        return p.eval()


def future_index(df: Any, steps: int) -> Any:
    """The ``steps`` timestamps after the end of ``df``'s index (its frequency, else its last spacing)."""
    import pandas as pd

    idx = df.index if isinstance(df, (pd.DataFrame, pd.Series)) else None
    if isinstance(idx, pd.PeriodIndex):
        idx = idx.to_timestamp()
    if not isinstance(idx, pd.DatetimeIndex) or len(idx) < 2:
        start = len(df) if hasattr(df, "__len__") else 0
        return pd.RangeIndex(start, start + steps)
    freq = idx.freq or pd.infer_freq(idx)
    if freq is not None:
        return pd.date_range(idx[-1], periods=steps + 1, freq=freq)[1:]
    step = idx[-1] - idx[-2]
    return pd.DatetimeIndex([idx[-1] + step * (i + 1) for i in range(steps)])


def _num_classes_in(path: Path) -> int:
    from .checkpoints import read_checkpoint, unwrap_state_dict

    sd, _ = unwrap_state_dict(read_checkpoint(path))
    w = sd.get("head.weight")
    if w is None:
        raise CheckpointError(f"{path} has no classifier (head.weight); it is not an ImageNet checkpoint")
    return int(w.shape[0])


def _variant_from_filename(name: str) -> str:
    from .backbones.registry import _PRETRAINED

    for arch, cfgs in _PRETRAINED.items():
        for c in cfgs:
            if c.filename == name:
                return f"{arch}.{c.tag}"
    raise InvalidInputError(f"cannot tell the architecture of {name!r}; pass backbone='unireplknet_s' (for example)")


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
    except Exception as e:  # any hub failure means "not available here"
        raise CheckpointError(
            f"could not get bundle {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it where a network exists and pass the local directory"
        ) from e


def update_card(directory: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
    """Set model-card ``fields`` of a saved bundle (``config.json`` → ``card``) and rewrite its ``README.md``.

    Only the two small files are rewritten (atomically); the weights are not touched. Returns the new config.
    """
    d = Path(directory)
    try:
        config = json.loads((d / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d} has no readable {CONFIG_NAME}: {e}") from e
    config.setdefault("card", {}).update(fields)
    _atomic_write_text(d / CONFIG_NAME, json.dumps(config, indent=2, default=list) + "\n")
    _atomic_write_text(d / CARD_NAME, _model_card(config))
    return config


def _atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, rename: a kill mid-write leaves the previous file intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _model_card(config: dict[str, Any]) -> str:
    card = config.get("card", {})
    lines = [
        f"# {card.get('name', 'uniperception bundle')}",
        "",
        card.get("description", f"A classifier of {config['modality']} inputs, built with uniperception."),
        "",
        f"- modality: `{config['modality']}`",
        f"- backbone: `{config['backbone']['name']}` ({'deploy' if config['backbone']['kwargs'].get('deploy') else 'training'} form)",
        f"- classes ({len(config['labels'])}): {', '.join(config['labels'][:20])}{' …' if len(config['labels']) > 20 else ''}",
        f"- weights stored as {config.get('weights_dtype', 'float32')}",
        f"- uniperception version: {config['uniperception_version']}, written {_dt.date.today().isoformat()}",
    ]
    for key in ("data", "command", "training_time", "metrics", "robustness", "limitations"):
        if key in card:
            val = card[key]
            lines += ["", f"## {key.replace('_', ' ').capitalize()}", "", json.dumps(val, indent=2) if isinstance(val, dict) else str(val)]
    lines += ["", "Load it with `uniperception.Perceiver.from_pretrained(<this directory>)`.", ""]
    return "\n".join(lines)
