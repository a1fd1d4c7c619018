"""Image adapter: path, PIL image, array or tensor → a normalised ``3×S×S`` crop (the ImageNet recipe).

Evaluation transform of the official code: resize the shorter side to ``size / crop_pct`` (bicubic,
antialiased), centre-crop ``size``, normalise with the stored mean/std. ``crop_pct=1`` resizes directly to
``size × size`` (the official 384² fine-tuned models). The embedding is the identity: images are already
``B×3×H×W``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidInputError, UnsupportedFormatError
from .base import AdapterConfig, ModalityAdapter, register_adapter

__all__ = ["ImageAdapter", "ImageConfig", "load_image"]


@dataclasses.dataclass
class ImageConfig(AdapterConfig):
    """Preprocessing of the image adapter (saved in bundles)."""

    size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def load_image(x: Any) -> Tensor:
    """Decode ``x`` (path, PIL image, ``H×W×C`` array / ``C×H×W`` tensor) to a float ``3×H×W`` tensor in [0, 1].

    uint8 inputs are scaled by 1/255; float inputs must already be in [0, 1]. Grey images are repeated to
    three channels, an alpha channel is dropped.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise InvalidInputError(f"image file not found: {p}")
        try:
            with Image.open(p) as im:
                x = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise UnsupportedFormatError(f"cannot decode image {p} (corrupt or unsupported format): {e}") from e
        except Exception as e:  # PIL's decoders also fail with ValueError, SyntaxError, struct.error, bombs, …
            raise UnsupportedFormatError(
                f"cannot decode image {p} (corrupt or unsupported format): {type(e).__name__}: {e}"
            ) from e
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8:
            t = torch.from_numpy(np.array(x, copy=True)).float() / 255.0
        elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
            t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        else:
            raise InvalidInputError(f"unsupported image array dtype {x.dtype}")
        if t.dim() == 3:
            t = t.permute(2, 0, 1)  # arrays are H×W×C
    elif isinstance(x, Tensor):
        if x.is_complex():
            raise InvalidInputError(f"unsupported image tensor dtype {x.dtype}")
        t = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    else:
        raise InvalidInputError(f"cannot read an image from {type(x).__name__}; pass a path, PIL image, array or tensor")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise InvalidInputError(f"an image must be H×W, H×W×C (array) or C×H×W (tensor); got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    if t.shape[0] != 3:
        raise InvalidInputError(f"an image needs 1, 3 or 4 channels, got {t.shape[0]}")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise InvalidInputError(f"empty image (shape {tuple(t.shape)}); an image needs at least one pixel")
    if not torch.isfinite(t).all():
        raise InvalidInputError("image contains NaN or Inf values")
    return t.contiguous()


@register_adapter
class ImageAdapter(ModalityAdapter):
    """RGB images (the backbone's native input)."""

    modality = "image"
    config_class = ImageConfig

    def __init__(self, config: ImageConfig | None = None) -> None:
        super().__init__(config or ImageConfig())

    @property
    def out_channels(self) -> int:
        return 3

    def preprocess(self, x: Any, *, train: bool = False, **kwargs: Any) -> Tensor:
        """Decode, resize, centre-crop and normalise one image → ``[1, 3, size, size]``."""
        cfg: ImageConfig = self.config  # type: ignore[assignment]
        img = load_image(x).unsqueeze(0)
        h, w = img.shape[-2:]
        if cfg.crop_pct >= 1.0:
            img = F.interpolate(img, size=(cfg.size, cfg.size), mode="bicubic", antialias=True, align_corners=False)
        else:
            short = int(cfg.size / cfg.crop_pct)
            scale = short / min(h, w)
            nh, nw = max(cfg.size, round(h * scale)), max(cfg.size, round(w * scale))
            img = F.interpolate(img, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - cfg.size) // 2, (nw - cfg.size) // 2
            img = img[..., top : top + cfg.size, left : left + cfg.size]
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        out = ((img - mean) / std).contiguous()
        if not torch.isfinite(out).all():  # float pixels far outside [0, 1] overflow the bicubic resize
            raise InvalidInputError("image values are too large; float images must lie in [0, 1] (uint8 in [0, 255])")
        return out

    def forward(self, batch: Tensor) -> Tensor:
        if batch.dim() != 4 or batch.shape[1] != 3:
            raise InvalidInputError(f"image batch must be B×3×H×W, got {tuple(batch.shape)}")
        return batch
