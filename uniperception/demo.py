"""What ``uniperception demo`` runs: the shipped bundles on sample inputs, a forecaster, re-parameterisation.

* :func:`run_bundle_demo`: every shipped bundle classifies the sample files that ship with the package
  (``uniperception/samples``: WAV keywords, MP4 sprite clips, PLY point clouds), inputs none of the bundles
  saw in training (held-out voices, an unseen synthesiser, sprite shapes never seen, a partial view).
* :func:`run_forecast_demo`: a :class:`~uniperception.Forecaster` fitted on the shipped ``airline.csv`` and
  backtested against seasonal-naive and ridge-on-lags baselines.
* :func:`run_reparam_demo`: a UniRepLKNet whose BatchNorm statistics are calibrated on crops of a real
  photograph (scikit-learn's bundled ``china.jpg``, or any image you pass) is re-parameterised; parameters,
  output agreement and speed of both forms are reported.

:func:`write_demo_samples` regenerates the sample files (maintainers; needs espeak-ng, sox and flite).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import create_model
from .errors import InvalidInputError

__all__ = [
    "SAMPLES_DIR",
    "BundleDemoRow",
    "DemoResult",
    "ForecastDemoResult",
    "demo_samples",
    "load_demo_image",
    "run_bundle_demo",
    "run_forecast_demo",
    "run_reparam_demo",
    "write_demo_samples",
]

#: Sample inputs that ship with the package (``manifest.json`` lists file, modality, true label and a note).
SAMPLES_DIR = Path(__file__).parent / "samples"

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_demo_image(path: str | Path | None = None) -> Tensor:
    """An RGB image as a float ``1×3×H×W`` tensor in [0, 1]; default: scikit-learn's ``china.jpg``."""
    if path is None:
        from sklearn.datasets import load_sample_image

        arr = load_sample_image("china.jpg")
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise InvalidInputError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255.0


def _crops(img: Tensor, n: int, size: int, gen: torch.Generator) -> Tensor:
    _, _, h, w = img.shape
    out = []
    for _ in range(n):
        s = int(torch.randint(min(h, w) // 3, min(h, w) + 1, (1,), generator=gen))
        y = int(torch.randint(0, h - s + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - s + 1, (1,), generator=gen))
        crop = F.interpolate(img[..., y : y + s, x : x + s], size=(size, size), mode="bilinear", antialias=True)
        out.append(crop)
    return (torch.cat(out) - _MEAN) / _STD


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: list[Tensor]) -> None:
    """Set every BatchNorm's running statistics to the cumulative average over ``batches``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for b in batches:
        model(b)
    for m, (mom, tr) in zip(bns, saved, strict=True):
        m.momentum = mom
        m.train(tr)


def _median_time(fn, x: Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclass
class DemoResult:
    """Figures of one demo run (times in seconds, medians)."""

    model: str
    image_size: int
    batch: int
    params_train: int
    params_deploy: int
    max_abs_diff: float
    max_logit: float
    time_train: float
    time_deploy: float
    top5: list[tuple[int, float]]

    @property
    def speedup(self) -> float:
        """Training-form time over deploy-form time."""
        return self.time_train / self.time_deploy


@torch.no_grad()
def run_reparam_demo(
    model_name: str = "unireplknet_a",
    image: str | Path | None = None,
    image_size: int = 224,
    batch: int = 8,
    repeats: int = 5,
    seed: int = 0,
) -> DemoResult:
    """Run the demo and return its figures (no printing; the CLI formats them)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    img = load_demo_image(image)
    model = create_model(model_name)
    calibrate_batchnorm(model, [_crops(img, 8, image_size, gen) for _ in range(4)])
    model.eval()
    deploy = copy.deepcopy(model).reparameterize()
    x = _crops(img, batch, image_size, gen)
    ref, out = model(x), deploy(x)
    for m in (model, deploy):  # warm-up
        m(x)
    t_train = _median_time(model, x, repeats)
    t_deploy = _median_time(deploy, x, repeats)
    probs = out[0].softmax(-1)
    top = probs.topk(5)
    return DemoResult(
        model=model_name, image_size=image_size, batch=batch,
        params_train=sum(p.numel() for p in model.parameters()),
        params_deploy=sum(p.numel() for p in deploy.parameters()),
        max_abs_diff=(out - ref).abs().max().item(), max_logit=ref.abs().max().item(),
        time_train=t_train, time_deploy=t_deploy,
        top5=[(int(i), float(p)) for p, i in zip(top.values, top.indices, strict=True)],
    )


# ------------------------------------------------------------------------------------ shipped bundles
@dataclass
class BundleDemoRow:
    """One sample classified by one bundle."""

    bundle: str
    file: str
    note: str
    expected: str
    predictions: list[Any]  # list[Prediction], best first
    seconds: float

    @property
    def correct(self) -> bool:
        """Whether the top prediction is the true label."""
        return bool(self.predictions) and self.predictions[0].label == self.expected


def demo_samples(directory: str | Path | None = None) -> list[dict[str, str]]:
    """The sample inputs: dicts with ``file`` (absolute path), ``modality``, ``label`` and ``note``."""
    d = Path(directory) if directory is not None else SAMPLES_DIR
    manifest = d / "manifest.json"
    if not manifest.is_file():
        raise InvalidInputError(f"no sample manifest at {manifest}")
    items = json.loads(manifest.read_text())
    return [{**it, "file": str(d / it["file"])} for it in items]


def run_bundle_demo(bundles: list[str] | None = None, samples: str | Path | None = None) -> list[BundleDemoRow]:
    """Classify every sample of each bundle's modality with each shipped bundle (default: all of them)."""
    from .perceiver import Perceiver, list_bundles

    rows = []
    items = demo_samples(samples)
    for name in bundles if bundles is not None else list_bundles():
        model = Perceiver.from_pretrained(name)
        for it in (it for it in items if it["modality"] == model.modality):
            t0 = time.perf_counter()
            preds = model.classify(it["file"], top_k=3)
            rows.append(BundleDemoRow(name, Path(it["file"]).name, it.get("note", ""), it["label"], preds,
                                      time.perf_counter() - t0))  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------ forecasting
@dataclass
class ForecastDemoResult:
    """A forecaster fitted on the sample series: its forecast and its backtest against baselines."""

    series: str
    length: int
    forecast: Any  # pandas DataFrame indexed by future timestamps
    backtest: Any  # pandas DataFrame: MAE/MSE/MASE per method
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def run_forecast_demo(
    csv: str | Path | None = None, horizon: int = 12, lookback: int = 36, epochs: int = 20
) -> ForecastDemoResult:
    """Fit a :class:`~uniperception.Forecaster` on a CSV series (default: the shipped ``airline.csv``).

    One fit, on everything but the last ``horizon`` steps: those are scored against the baselines (never
    seen in training), then the same model forecasts the ``horizon`` steps after the end of the series.
    """
    from .datasets import load_ett_csv
    from .forecasting import Forecaster

    path = Path(csv) if csv is not None else SAMPLES_DIR / "airline.csv"
    df = load_ett_csv(path)
    t0 = time.perf_counter()
    f = Forecaster(horizon=horizon, lookback=lookback, epochs=epochs).fit(df.iloc[:-horizon])
    backtest = f.backtest(df, windows=1, refit=False)  # the held-out last window
    forecast = f.predict(df)
    return ForecastDemoResult(path.name, len(df), forecast, backtest, time.perf_counter() - t0,
                              {"horizon": horizon, "lookback": lookback, "epochs": epochs, "windows": 1})


# ------------------------------------------------------------------------------------ sample files
def write_demo_samples(out_dir: str | Path = SAMPLES_DIR) -> Path:
    """(Re)generate the sample files from the test splits of the datasets (never from training data)."""
    import numpy as np
    import soundfile as sf

    from .datasets import KeywordSpeech, MovingSprites, load_series
    from .datasets._common import import_open3d
    from .datasets.shapes import partial_view, sample_shape

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items: list[dict[str, str]] = []

    def keyword(synth: str, word: str, note: str) -> None:
        ds = KeywordSpeech(split="test", synth=synth, seed=0, progress=False)
        i = next(i for i, r in enumerate(ds.samples) if r["label"] == word)
        wav, sr, _ = ds[i]
        name = f"keyword-{word.strip('_')}-{synth}.wav"
        sf.write(out / name, wav.numpy().T, sr, subtype="PCM_16")
        items.append({"file": name, "modality": "audio", "label": word,
                      "note": note.format(voice=ds.samples[i]["voice"])})  # fmt: skip

    keyword("espeak", "yes", "held-out espeak voice {voice}")
    keyword("espeak", "left", "held-out espeak voice {voice}")
    keyword("flite", "stop", "flite voice {voice}: synthesiser never heard")

    def sprite(direction: str, shapes: tuple[str, ...] | None, note: str) -> None:
        kw = {"sprite_shapes": shapes} if shapes else {}
        ds = MovingSprites(split="test", seed=0, progress=False, **kw)
        i = next(i for i, r in enumerate(ds.samples) if r["label"] == direction)
        name = f"sprite-{direction}-{ds.samples[i]['shape']}.mp4"
        shutil.copyfile(ds.path / ds.samples[i]["file"], out / name)
        items.append({"file": name, "modality": "video", "label": direction, "note": note})

    sprite("up-left", None, "test clip")
    sprite("down", ("cross", "ring"), "sprite shape never seen")

    o3d = import_open3d()

    def cloud(shape: str, n: int, seed: int, note: str, partial: bool = False) -> None:
        rng = np.random.default_rng([seed, 7])
        pts = sample_shape(shape, n, rng)
        if partial:  # keep what one camera sees (Open3D hidden-point removal)
            pts = partial_view(pts, rng)
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts.astype(np.float64)))
        name = f"shape-{shape}{'-partial' if partial else ''}-{len(pts)}pts.ply"
        if not o3d.io.write_point_cloud(str(out / name), pc, write_ascii=False):
            raise RuntimeError(f"Open3D could not write {name}")
        items.append({"file": name, "modality": "points", "label": shape, "note": note})

    cloud("torus", 1024, 1, "1024 points")
    cloud("cone", 4096, 2, "one partial view", partial=True)

    series = load_series("airline")
    series.index.name = "date"
    series.to_csv(out / "airline.csv", float_format="%.6g")
    (out / "manifest.json").write_text(json.dumps(items, indent=2) + "\n")
    return out
