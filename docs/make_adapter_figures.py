"""Make the figures of ``docs/adapters.md`` (PNG files in ``docs/img/``), headless (matplotlib Agg).

    python docs/make_adapter_figures.py                   # the four figures (a few seconds)
    python docs/make_adapter_figures.py --measure-series  # also re-run the series layout measurement (minutes)

Every input is synthesised or ships with a package (statsmodels' co2 for the series figure), so the script
runs offline.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from uniperception.adapters.audio import AudioAdapter, AudioConfig
from uniperception.adapters.points import PointCloudAdapter, PointsConfig, _import_open3d
from uniperception.adapters.series import SeriesAdapter, SeriesConfig, denormalize, estimate_period
from uniperception.adapters.video import VideoAdapter, VideoConfig

logger = logging.getLogger("make_adapter_figures")
IMG = Path(__file__).resolve().parent / "img"


def audio_figure(path: Path) -> None:
    """A 1.6 s stereo 22.05 kHz signal (chirp + tone burst) → the 2 sliding windows; and the official 128-frame pad."""
    rate = 22050
    t = np.arange(int(1.6 * rate)) / rate
    chirp = 0.3 * np.sin(2 * np.pi * (200 * t + 900 * t**2))
    burst = 0.2 * np.sin(2 * np.pi * 1000 * t) * ((t > 0.9) & (t < 1.3))
    noise = 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    x = np.stack([chirp + burst + noise, chirp + noise], axis=1).astype(np.float32)
    windows = AudioAdapter().preprocess(x, sample_rate=rate)
    official = AudioAdapter(AudioConfig.official()).preprocess(x[:rate], sample_rate=rate)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), gridspec_kw={"width_ratios": [1.4, 1, 1, 1.3]})
    axes[0].plot(t, x[:, 0], lw=0.4)
    axes[0].set(title="waveform (left channel), 22.05 kHz stereo", xlabel="s")
    for k in range(2):
        im = axes[1 + k].imshow(windows[k, 0], origin="lower", aspect="auto", cmap="magma", vmin=-1, vmax=1.3)
        axes[1 + k].set(
            title=f"window {k}: {0.6 * k:.1f}–{0.6 * k + 1:.1f} s", xlabel="frame", ylabel="mel bin"
        )
    axes[3].imshow(official[0, 0], origin="lower", aspect="auto", cmap="magma", vmin=-1, vmax=1.3)
    axes[3].set(title="official: 1 s padded to 128 frames", xlabel="frame")
    fig.colorbar(im, ax=axes[3], label="normalised log-mel")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _moving_disc_clip(t: int = 16, h: int = 96, w: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        cx, cy = 20 + i * (w - 40) / (t - 1), h / 2 + 25 * math.sin(i / 3)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 14**2
        frames[i, ..., 0] = (xx * 255 / w).astype(np.uint8)
        frames[i, ..., 2] = 90
        frames[i][disc] = (255, 230, 40)
    return frames


def video_figure(path: Path) -> None:
    """The same 16-frame clip in the tile layout and in the official raw reshape."""
    clip = _moving_disc_clip()
    tile = VideoAdapter(VideoConfig(num_frames=16, size=48))
    official = VideoAdapter(VideoConfig(num_frames=16, size=48, layout="official"))
    mean, std = torch.tensor(tile.config.mean).view(3, 1, 1), torch.tensor(tile.config.std).view(3, 1, 1)

    def show(ax, img: torch.Tensor, title: str) -> None:
        ax.imshow(((img * std + mean).clamp(0, 1)).permute(1, 2, 0).numpy())
        ax.set(title=title, xticks=[], yticks=[])

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    show(axes[0], tile(tile.preprocess(clip))[0], "layout='tile' (default): frame t at cell (t // 4, t % 4)")
    show(
        axes[1],
        official(official.preprocess(clip))[0],
        "layout='official': raw reshape 3×16×48×48 → 3×192×192",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _chair_mesh():
    o3d = _import_open3d()
    mesh = o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 0.1).translate((0, 0, 0.5))  # seat
    mesh += o3d.geometry.TriangleMesh.create_box(1.0, 0.1, 0.9).translate((0, 0.9, 0.6))  # back
    for x, y in ((0.05, 0.05), (0.95, 0.05), (0.05, 0.95), (0.95, 0.95)):
        mesh += o3d.geometry.TriangleMesh.create_cylinder(0.04, 0.5).translate((x, y, 0.25))
    return mesh


def points_figure(path: Path) -> None:
    """A chair mesh → surface samples → 4 views × (depth, back, occupancy)."""
    ad = PointCloudAdapter(PointsConfig(image_size=96))
    pts = ad.preprocess(_chair_mesh())
    img = ad(pts)
    fig = plt.figure(figsize=(13, 9.5))
    ax = fig.add_subplot(4, 4, 1, projection="3d")
    p = pts[0].numpy()
    ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=1, c=p[:, 2], cmap="viridis")
    ax.set(title=f"{len(p)} FPS points (unit sphere)", xticks=[], yticks=[], zticks=[])
    names = ad.config.maps
    for v in range(ad.views):
        for c, name in enumerate(names):
            a = fig.add_subplot(4, 4, 4 * v + c + 2)
            a.imshow(img[v, c], cmap="gray" if name == "occupancy" else "viridis", vmin=0, vmax=1)
            a.set(xticks=[], yticks=[])
            if v == 0:
                a.set_title(name)
            if c == 0:
                a.set_ylabel(f"view {v}: azimuth {90 * v}°")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _co2():
    from uniperception.datasets.timeseries import load_series

    return load_series("co2", nan_policy="interpolate")


def series_figure(path: Path) -> None:
    """One 208-week co2 window: the normalised values, the period image (P = 52) and the official square."""
    df = _co2()
    window = df.iloc[-208:]
    period = SeriesAdapter(SeriesConfig(lookback=208, layout="period", period=estimate_period(df)))
    torch.manual_seed(0)
    official = SeriesAdapter(SeriesConfig(lookback=208)).eval()
    w = period.preprocess(window)
    with torch.no_grad():
        pimg, oimg = period(w)[0], official(w)[0, 0]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1.6, 0.6, 1]})
    axes[0].plot(window.index, w[0, :, 0].numpy())
    axes[0].set(title="co2, last 208 weeks, instance-normalised")
    axes[1].imshow(pimg[0], aspect="auto", cmap="coolwarm")
    axes[1].set(
        title=f"period: {pimg.shape[1]} (phase) × {pimg.shape[2]} (cycles)", xlabel="cycle", ylabel="week"
    )
    axes[2].imshow(oimg, cmap="coolwarm")
    axes[2].set(title=f"official: 208 × {official.d_model} embedding → {oimg.shape[0]} × {oimg.shape[1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _tiny_model(ad, outputs: int):
    from torch import nn

    from uniperception.backbones import UniRepLKNet

    backbone = UniRepLKNet(
        in_chans=ad.out_channels,
        num_classes=0,
        depths=(1, 1, 1, 1),
        dims=(8, 16, 32, 64),
        kernel_sizes=((3,), (7,), (3,), (3,)),
    )
    return nn.Sequential(ad, backbone, nn.Linear(64, outputs))


def _train(model, x: torch.Tensor, loss_fn, steps: int, batch: int, seed: int, wd: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = loss_fn(model(x[i]), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def measure_forecasting(layout: str, lookback: int, horizon: int = 26, seeds: int = 3) -> str:
    """co2 weekly (last 30 % as test): tiny UniRepLKNet + linear head; test MSE/MAE in ppm² / ppm."""
    df = _co2()
    y = df.to_numpy(np.float32)[:, 0]
    split = int(0.7 * len(y))
    spans = {
        "train": range(0, split - lookback - horizon + 1),
        "test": range(split - lookback, len(y) - lookback - horizon + 1),
    }
    kw = {"period": estimate_period(y[:split])} if layout == "period" else {}
    res = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        ad = SeriesAdapter(SeriesConfig(lookback=lookback, layout=layout, **kw))
        data = {}
        for name, starts in spans.items():
            pieces = [ad.preprocess(df.iloc[s : s + lookback], return_stats=True) for s in starts]
            mean, std = torch.cat([p[1].mean for p in pieces]), torch.cat([p[1].std for p in pieces])
            target = torch.from_numpy(
                np.stack([y[s + lookback : s + lookback + horizon] for s in starts])
            ).unsqueeze(-1)
            data[name] = (torch.cat([p[0] for p in pieces]), (target - mean) / std, (mean, std), target)
        model = _tiny_model(ad, horizon)
        x, t = data["train"][:2]
        secs = _train(
            model, x, lambda out, i, t=t: (out.unsqueeze(-1) - t[i]).square().mean(), 600, 32, seed, 0.01
        )
        x, _, stats, target = data["test"]
        with torch.no_grad():
            pred = denormalize(model(x).unsqueeze(-1), stats)
        res.append(((pred - target).square().mean().item(), (pred - target).abs().mean().item(), secs))
    r = np.array(res)
    shape = tuple(ad(x[:1]).shape[1:])
    return f"| co2, lookback {lookback} | {layout} {shape} | MSE {r[:, 0].mean():.3f} ± {r[:, 0].std():.3f} (MAE {r[:, 1].mean():.3f}) | {r[:, 2].mean():.0f} s |"


def measure_classification(name: str, layout: str, seeds: int = 3) -> str:
    """A UCR/UEA set from sktime: tiny UniRepLKNet + linear head, 300 steps; test accuracy."""
    from torch import nn

    from uniperception.datasets.timeseries import load_classification

    tr, te = load_classification(name, "train"), load_classification(name, "test")
    n_vars, length = tr.X.shape[1], tr.X.shape[2]
    # the typical period of one case (concatenating cases would make each case one "period")
    kw = {"period": int(np.median([estimate_period(x.T) for x in tr.X]))} if layout == "period" else {}
    res = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        ad = SeriesAdapter(
            SeriesConfig(lookback=length, num_variables=n_vars, layout=layout, calendar=False, **kw)
        )
        xtr = torch.cat([ad.preprocess(x.T) for x in tr.X])  # sktime gives variables × time: transpose
        xte = torch.cat([ad.preprocess(x.T) for x in te.X])
        ytr, yte = torch.from_numpy(tr.y), torch.from_numpy(te.y)
        model = _tiny_model(ad, len(tr.classes))
        secs = _train(
            model, xtr, lambda out, i, ytr=ytr: nn.functional.cross_entropy(out, ytr[i]), 300, 16, seed, 0.05
        )
        with torch.no_grad():
            res.append(((model(xte).argmax(1) == yte).float().mean().item(), secs))
    r = np.array(res)
    shape = tuple(ad(xte[:1]).shape[1:])
    return f"| {name} | {layout} {shape} | accuracy {r[:, 0].mean():.3f} ± {r[:, 0].std():.3f} | {r[:, 1].mean():.0f} s |"


def measure_series() -> None:
    """The layout measurement of docs/adapters.md (one thread; 3 seeds per cell)."""
    torch.set_num_threads(1)
    rows = [
        "| task | layout (C', H, W) | test metric (mean ± std over 3 seeds) | train time per run |",
        "|---|---|---|---|",
    ]
    for lookback in (96, 208):
        for layout in ("official", "period"):
            rows.append(measure_forecasting(layout, lookback))
            logger.warning(rows[-1])
    for name in ("GunPoint", "ItalyPowerDemand", "BasicMotions"):
        for layout in ("official", "period"):
            rows.append(measure_classification(name, layout))
            logger.warning(rows[-1])
    logger.warning("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-series", action="store_true", help="re-run the series layout measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    IMG.mkdir(parents=True, exist_ok=True)
    audio_figure(IMG / "adapter_audio.png")
    video_figure(IMG / "adapter_video.png")
    points_figure(IMG / "adapter_points.png")
    series_figure(IMG / "adapter_series.png")
    if args.measure_series:
        measure_series()


if __name__ == "__main__":
    main()
