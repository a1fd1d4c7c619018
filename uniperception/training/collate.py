"""Turning raw dataset samples into model batches through an adapter's processor.

Datasets know nothing of models: they return raw inputs (a waveform and its rate, a point array, video
frames, an image) and a label. :class:`AdapterCollate` runs the adapter's processor on each sample (in
DataLoader workers when ``num_workers > 0``) and stacks the results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapters import ModalityAdapter
from ..errors import InvalidInputError

__all__ = ["AdapterCollate", "default_unpack"]


def default_unpack(sample: Any) -> tuple[Any, dict[str, Any], Any]:
    """``(x, label)`` → x, {}, label; ``(waveform, sample_rate, label)`` → x, {"sample_rate": sr}, label;
    a dict with ``input``/``label`` (and optional ``sample_rate``) works too."""
    if isinstance(sample, dict):
        kw = {"sample_rate": sample["sample_rate"]} if "sample_rate" in sample else {}
        return sample["input"], kw, sample["label"]
    if isinstance(sample, (tuple, list)):
        if len(sample) == 2:
            return sample[0], {}, sample[1]
        if len(sample) == 3 and isinstance(sample[1], (int, float)):
            return sample[0], {"sample_rate": int(sample[1])}, sample[2]
    raise InvalidInputError(
        "cannot unpack a dataset sample: expected (input, label), (waveform, sample_rate, label) or a dict "
        "with 'input' and 'label'; pass unpack= to AdapterCollate"
    )


class AdapterCollate:
    """Collate raw samples: processor on each (first piece of each), stack inputs, tensor of labels.

    ``train=True`` enables the processor's augmentation and, for inputs cut into several pieces (sliding
    windows), picks one piece at random instead of the first.
    """

    def __init__(
        self,
        adapter: ModalityAdapter,
        train: bool = False,
        unpack: Callable[[Any], tuple[Any, dict[str, Any], Any]] = default_unpack,
    ) -> None:
        self.adapter = adapter
        self.train = train
        self.unpack = unpack

    def __call__(self, samples: Sequence[Any]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for s in samples:
            x, kw, y = self.unpack(s)
            pieces = self.adapter.preprocess(x, train=self.train, **kw)
            i = int(torch.randint(pieces.shape[0], (1,))) if self.train and pieces.shape[0] > 1 else 0
            xs.append(pieces[i])
            ys.append(torch.as_tensor(y))
        return torch.stack(xs), torch.stack(ys)
