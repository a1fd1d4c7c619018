"""Modality adapters: shapes, value ranges, official layouts/constants, conversions and the error table.

Test media (WAV/FLAC, MP3/OGG, MP4/AVI, PLY/OFF/PCD, CSV) are generated at test time into tmp paths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from uniperception.adapters.audio import AUDIO_NORM_MEAN, AUDIO_NORM_STD, AudioAdapter, AudioConfig
from uniperception.adapters.base import build_adapter
from uniperception.adapters.points import (
    PointCloudAdapter,
    PointsConfig,
    farthest_point_sample,
    farthest_point_set,
    normalize_points,
    sample_mesh_surface,
)
from uniperception.adapters.series import (
    SeriesAdapter,
    SeriesConfig,
    calendar_features,
    denormalize,
    estimate_period,
    fold_by_period,
    normalize,
)
from uniperception.adapters.video import (
    VideoAdapter,
    VideoConfig,
    read_video_frames,
    sample_frame_indices,
    tile_grid,
)
from uniperception.errors import InvalidInputError, UnsupportedFormatError

SR = 16000


def sine(freq: float, seconds: float, rate: int, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    """``samples × channels`` float32 sine."""
    t = np.arange(round(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1)


def write_audio_av(path, x: np.ndarray, rate: int, codec: str) -> None:
    """Encode ``samples × channels`` float audio with PyAV."""
    import av

    layout = "stereo" if x.shape[1] == 2 else "mono"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = layout
        planar = np.ascontiguousarray(x.T)
        step = 960
        for i in range(0, planar.shape[1], step):
            fr = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, i : i + step]), format="fltp", layout=layout
            )
            fr.sample_rate = rate
            fr.pts = i
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def write_video_av(path, frames: np.ndarray, codec: str = "libx264", fps: int = 25) -> None:
    """Encode ``T×H×W×3`` uint8 frames with PyAV."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def tiny_backbone(in_chans: int) -> torch.nn.Module:
    from uniperception.backbones import UniRepLKNet

    return UniRepLKNet(
        in_chans=in_chans,
        num_classes=0,
        depths=(1, 1, 1, 1),
        dims=(8, 16, 32, 64),
        kernel_sizes=((3,), (7,), (3,), (3,)),
    ).eval()


def o3d():
    from uniperception.adapters.points import _import_open3d

    return _import_open3d()


# ============================================================================================ audio


def test_audio_official_constants_and_fbank_settings() -> None:
    from torchaudio.compliance import kaldi

    assert (AUDIO_NORM_MEAN, AUDIO_NORM_STD) == (-6.845978, 5.5654526)
    ad = AudioAdapter(AudioConfig.official())
    x = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1 + 0.05
    out = ad.preprocess(x, sample_rate=SR)
    assert out.shape == (1, 1, 128, 128)
    w = torch.from_numpy(x)
    ref = kaldi.fbank(
        (w - w.mean()).unsqueeze(0),
        htk_compat=True,
        sample_frequency=SR,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    assert ref.shape == (98, 128)
    ref = torch.nn.functional.pad(ref, (0, 0, 0, 30))  # official: zero-pad the log-mel frames to 128
    ref = (ref - (-6.845978)) / (5.5654526 * 2)
    torch.testing.assert_close(out[0, 0], ref.t(), rtol=0, atol=1e-5)  # mel on H, time on W
    # padded frames hold the normalised zero
    torch.testing.assert_close(out[0, 0, :, 100:], torch.full((128, 28), 6.845978 / 11.1309052))


def test_audio_default_frames_are_one_window() -> None:
    ad = AudioAdapter()
    assert ad.config.num_frames() == 98  # 1 s at 16 kHz with Kaldi snip_edges, not 101
    assert ad.preprocess(sine(440, 1.0, SR), sample_rate=SR).shape == (1, 1, 128, 98)
    assert ad.out_channels == 1


def test_audio_mean_norm_removes_gain_and_fixed_colouring() -> None:
    rng = np.random.default_rng(0)
    speechy = (sine(300, 1.0, SR)[:, 0] * np.linspace(0, 1, SR) + 0.05 * rng.standard_normal(SR)).astype(np.float32)
    ad = AudioAdapter(AudioConfig(mean_norm=True, num_mel_bins=64))
    a = ad.preprocess(speechy, sample_rate=SR)
    b = ad.preprocess(speechy * 0.25, sample_rate=SR)  # -12 dB: a constant shift of every log-mel bin
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    plain = AudioAdapter(AudioConfig(num_mel_bins=64))
    assert float((plain.preprocess(speechy, sample_rate=SR) - plain.preprocess(speechy * 0.25, sample_rate=SR))
                 .abs().max()) > 0.1
    # each mel bin is centred on the global mean over the window's frames
    per_bin = a[0, 0].mean(1) * 2 * ad.config.norm_std
    assert float(per_bin.abs().max()) < 1e-4


def test_audio_resample_and_mixdown_keep_the_peak_mel_bin() -> None:
    ad = AudioAdapter()
    mono = ad.preprocess(sine(1000, 1.0, SR)[:, 0], sample_rate=SR)
    stereo = ad.preprocess(sine(1000, 1.0, 44100, channels=2), sample_rate=44100)
    assert stereo.shape == mono.shape
    peak_m = int(mono[0, 0].mean(1).argmax())
    peak_s = int(stereo[0, 0].mean(1).argmax())
    assert peak_m == peak_s
    assert 30 < peak_m < 60  # 1 kHz sits in the lower half of a 128-bin 20 Hz–8 kHz mel scale
    # mix-down averages the channels: an antiphase stereo pair is silence
    anti = sine(1000, 1.0, SR, channels=2) * np.array([1.0, -1.0], np.float32)
    silent = ad.preprocess(anti, sample_rate=SR)
    assert float(silent.max()) < -0.8 and float(mono.max()) > 0.5
    # channels × samples tensors and int16 PCM are read the same way
    pcm = (sine(1000, 1.0, SR, channels=2) * 32767).astype(np.int16)
    t_in = ad.preprocess(torch.from_numpy(pcm.T.copy()), sample_rate=SR)
    assert int(t_in[0, 0].mean(1).argmax()) == peak_m


@pytest.mark.parametrize(("seconds", "windows"), [(0.3, 1), (1.0, 1), (1.2, 2), (3.2, 6), (4.0, 7)])
def test_audio_sliding_windows(seconds: float, windows: int) -> None:
    ad = AudioAdapter()  # 1 s windows, 0.5 s hop
    out = ad.preprocess(sine(300, seconds, SR), sample_rate=SR)
    assert out.shape == (windows, 1, 128, 98)
    starts = ad.window_starts(round(seconds * SR))
    assert len(starts) == windows
    if seconds > 1:
        assert starts[-1] + SR == round(seconds * SR)  # the last window ends at the end


def test_audio_silence_and_tiny_input_are_finite() -> None:
    ad = AudioAdapter()
    floor = (math.log(torch.finfo(torch.float32).eps) - AUDIO_NORM_MEAN) / (2 * AUDIO_NORM_STD)
    for x in (np.zeros(SR), np.full(SR, 0.7), np.zeros(5)):
        out = ad.preprocess(x, sample_rate=SR)
        assert torch.isfinite(out).all()
    silent = ad.preprocess(np.zeros(SR), sample_rate=SR)
    torch.testing.assert_close(silent, torch.full_like(silent, floor))


def test_audio_train_augmentation_is_reproducible_and_eval_deterministic() -> None:
    ad = AudioAdapter()
    x = sine(500, 1.0, SR)[:, 0]
    ev1, ev2 = ad.preprocess(x, sample_rate=SR), ad.preprocess(x, sample_rate=SR)
    assert torch.equal(ev1, ev2)
    tr1 = ad.preprocess(x, sample_rate=SR, train=True, generator=torch.Generator().manual_seed(3))
    tr2 = ad.preprocess(x, sample_rate=SR, train=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tr1, tr2) and not torch.equal(tr1, ev1)
    no_aug = AudioAdapter(AudioConfig(freq_mask=0, time_mask=0, noise=False))
    assert torch.equal(no_aug.preprocess(x, sample_rate=SR, train=True), ev1)


def test_audio_files(tmp_path) -> None:
    import soundfile as sf

    ad = AudioAdapter()
    x = sine(1000, 1.5, 44100, channels=2)
    sf.write(tmp_path / "a.wav", x, 44100, subtype="FLOAT")
    sf.write(tmp_path / "a.flac", x, 44100, subtype="PCM_24")
    write_audio_av(tmp_path / "a.mp3", x, 44100, "libmp3lame")
    write_audio_av(tmp_path / "a.ogg", sine(1000, 1.5, 48000, channels=2), 48000, "libopus")
    ref = ad.preprocess(x, sample_rate=44100)
    wav = ad.preprocess(tmp_path / "a.wav")
    torch.testing.assert_close(wav, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(ad.preprocess(str(tmp_path / "a.flac")), ref, atol=2e-3, rtol=0)
    peak = int(ref[0, 0].mean(1).argmax())
    for name in ("a.mp3", "a.ogg"):
        out = ad.preprocess(tmp_path / name)
        assert out.shape[1:] == (1, 128, 98) and out.shape[0] in (2, 3)  # codec priming may add samples
        assert int(out[0, 0].mean(1).argmax()) == peak


# ============================================================================================ video


def test_video_official_reshape_memory_order() -> None:
    """Small analog of the spec: for 224² frames, frame t fills rows 56t…56t+55 of the 896² image."""
    ad = VideoAdapter(VideoConfig(num_frames=16, size=8, layout="official"))
    x = torch.randn(2, 3, 16, 8, 8)
    out = ad(x)
    assert out.shape == (2, 3, 32, 32)  # H·4, W·4
    rows = 8 // 4  # = 56 for 224
    for t in range(16):
        block = out[:, :, rows * t : rows * (t + 1), :]
        assert torch.equal(block.reshape(2, 3, -1), x[:, :, t].reshape(2, 3, -1))
        for j in range(rows):  # each image row: 4 consecutive source rows side by side
            for k in range(4):
                assert torch.equal(out[:, :, rows * t + j, 8 * k : 8 * (k + 1)], x[:, :, t, 4 * j + k])
    assert torch.equal(out, x.reshape(2, 3, 32, 32))
    with pytest.raises(InvalidInputError):
        VideoAdapter(VideoConfig(num_frames=8, layout="official"))


@pytest.mark.parametrize(
    ("t", "grid"), [(8, (2, 4)), (16, (4, 4)), (4, (2, 2)), (7, (3, 3)), (12, (3, 4)), (1, (1, 1))]
)
def test_video_tile_layout_places_frames(t: int, grid: tuple[int, int]) -> None:
    assert tile_grid(t) == grid
    rows, cols = grid
    ad = VideoAdapter(VideoConfig(num_frames=t, size=5))
    x = torch.randn(2, 3, t, 5, 5)
    out = ad(x)
    assert out.shape == (2, 3, 5 * rows, 5 * cols)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        cell = out[:, :, 5 * r : 5 * r + 5, 5 * c : 5 * c + 5]
        assert torch.equal(cell, x[:, :, i] if i < t else torch.zeros_like(cell))


def test_video_channels_layout() -> None:
    ad = VideoAdapter(VideoConfig(num_frames=4, size=6, layout="channels"))
    assert ad.out_channels == 12
    x = torch.randn(2, 3, 4, 6, 6)
    out = ad(x)
    for t in range(4):
        for c in range(3):
            assert torch.equal(out[:, 3 * t + c], x[:, c, t])


def test_video_frame_sampling() -> None:
    cfg = VideoConfig(num_frames=8)
    assert sample_frame_indices(40, cfg) == [[2, 7, 12, 17, 22, 27, 32, 37]]
    short = sample_frame_indices(3, cfg)[0]  # shorter than T: frames repeat, in order, all used
    assert len(short) == 8 and short == sorted(short) and set(short) == {0, 1, 2}
    two = sample_frame_indices(40, VideoConfig(num_frames=8, num_clips=2))
    assert two[0] != two[1] and all(0 <= i < 40 for c in two for i in c)
    stride = VideoConfig(num_frames=4, frame_stride=4, num_clips=3)
    assert sample_frame_indices(100, stride) == [[0, 4, 8, 12], [44, 48, 52, 56], [87, 91, 95, 99]]
    assert sample_frame_indices(6, VideoConfig(num_frames=4, frame_stride=4)) == [[0, 4, 5, 5]]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert sample_frame_indices(40, cfg, train=True, generator=g1) == sample_frame_indices(
        40, cfg, train=True, generator=g2
    )


def _coloured_frames(t: int, h: int = 48, w: int = 80) -> np.ndarray:
    fr = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        fr[i, ..., 0] = 6 * i  # frame index encoded in the red channel
        fr[i, ..., 1] = 100
    return fr


def test_video_file_decoding_and_shapes(tmp_path) -> None:
    frames = _coloured_frames(40)
    write_video_av(tmp_path / "v.mp4", frames)
    write_video_av(tmp_path / "v.avi", frames, codec="mpeg4")
    ad = VideoAdapter()
    out = ad.preprocess(tmp_path / "v.mp4")
    assert out.shape == (1, 3, 8, 64, 64)
    red = out[0, 0, :, 32, 32] * 0.229 + 0.485
    np.testing.assert_allclose((red * 255 / 6).numpy(), [2, 7, 12, 17, 22, 27, 32, 37], atol=0.6)
    arr = ad.preprocess(frames)
    torch.testing.assert_close(out, arr, atol=0.06, rtol=0)  # codec loss only
    assert (ad.preprocess(str(tmp_path / "v.avi")) - arr).abs().mean() < 0.05  # MPEG-4 part 2 is lossier
    # only the requested frames are kept
    kept = read_video_frames(tmp_path / "v.mp4", [3, 9], 24)
    assert sorted(kept) == [3, 9] and kept[3].shape == (3, 24, 40)
    # evaluation crops and the official preset's piece count
    three = VideoAdapter(VideoConfig(num_frames=4, num_clips=2, num_crops=3, size=32)).preprocess(frames)
    assert three.shape == (6, 3, 4, 32, 32)
    assert VideoAdapter(VideoConfig(frame_stride=2)).preprocess(frames, train=True).shape == (1, 3, 8, 64, 64)


def test_video_normalisation_range() -> None:
    ad = VideoAdapter(VideoConfig(num_frames=4, size=16))
    white = ad.preprocess(np.full((4, 20, 30, 3), 255, np.uint8))
    black = ad.preprocess(np.zeros((4, 20, 30, 3), np.float32))
    mean, std = torch.tensor(ad.config.mean), torch.tensor(ad.config.std)
    torch.testing.assert_close(white[0, :, 0, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(black[0, :, 0, 0, 0], -mean / std)


# ============================================================================================ points


def test_point_normalisation_and_fps() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) * torch.tensor([3.0, 1.0, 0.5]) + torch.tensor([10.0, -4.0, 2.0])
    n = normalize_points(x)
    torch.testing.assert_close(n.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert abs(float(n.norm(dim=1).max()) - 1) < 1e-6
    ad = PointCloudAdapter(PointsConfig(num_points=128))
    out = ad.preprocess(x.numpy())
    assert out.shape == (1, 128, 3)
    assert abs(float(out[0].norm(dim=1).max()) - 1) < 1e-5  # FPS starts at the farthest point
    # FPS spreads: a dense blob plus 4 far corners → the corners are picked first
    blob = torch.cat(
        [
            torch.randn(1000, 3, generator=g) * 0.01,
            torch.tensor([[1.0, 1, 1], [-1, -1, 1], [1, -1, -1], [-1, 1, -1]]),
        ]
    )
    idx = farthest_point_sample(blob, 5)
    assert set(idx[:4].tolist()) == {1000, 1001, 1002, 1003}
    cloud = torch.rand(2000, 3, generator=g)
    fps = cloud[farthest_point_sample(cloud, 64)]
    rnd = cloud[torch.randperm(2000, generator=g)[:64]]
    assert torch.pdist(fps).min() > 2 * torch.pdist(rnd).min()
    # fewer points than num_points: padded by repetition
    few = ad.preprocess(np.random.default_rng(0).random((10, 3)))
    assert few.shape == (1, 128, 3) and torch.equal(few[0, :10], few[0, 10:20])


@pytest.mark.parametrize("n,m,start", [(1500, 1024, 7), (2048, 1024, None), (333, 100, 0), (4001, 1024, 4000)])
def test_fast_fps_picks_the_same_points(n: int, m: int, start: int | None) -> None:
    """The Open3D sampler the adapter uses chooses exactly the tensor loop's points (as a sorted set)."""
    cloud = torch.rand(n, 3, generator=torch.Generator().manual_seed(n)) * torch.tensor([2.0, 1.0, 0.5])
    ref = farthest_point_sample(cloud, m, start)
    fast = farthest_point_set(cloud, m, start)
    assert torch.equal(fast, ref.sort().values)
    # duplicated points (dropout fills with copies): fewer distinct points than asked for still gives m rows
    dup = torch.cat([cloud[: m - 3], cloud[: n - m + 3]])
    assert torch.equal(farthest_point_set(dup, m, start), farthest_point_sample(dup, m, start).sort().values)
    # the adapter's training path (random start, features carried along) keeps the rows whole
    ad = PointCloudAdapter(PointsConfig(num_points=m, in_features=1))
    rows = torch.cat([cloud, torch.arange(n, dtype=torch.float32)[:, None]], dim=1)
    out = ad.preprocess(rows.numpy())[0]
    assert torch.equal(out[:, 3].long().sort().values, farthest_point_sample(normalize_points(cloud), m).sort().values)


def test_point_projection_invariances_and_range() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3000, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5])
    ad = PointCloudAdapter(PointsConfig(num_points=256, image_size=32))
    assert ad.views == 4 and ad.out_channels == 3
    img = ad(ad.preprocess(x))
    assert img.shape == (4, 3, 32, 32)
    moved = ad(ad.preprocess(x * 3.7 + torch.tensor([5.0, -2.0, 9.0])))
    torch.testing.assert_close(img, moved, atol=1e-5, rtol=0)
    # the embedding alone is invariant too (it re-normalises every cloud)
    batch = ad.preprocess(x)
    torch.testing.assert_close(ad(batch * 0.2 - 3), img, atol=1e-5, rtol=0)
    assert img.min() >= 0 and img.max() <= 1
    depth, back, occ = img[:, 0], img[:, 1], img[:, 2]
    assert set(occ.unique().tolist()) <= {0.0, 1.0} and occ.mean() > 0.05
    assert (depth[occ == 0] == 0).all() and (depth >= back).all()


def test_point_zbuffer_top_view() -> None:
    ad = PointCloudAdapter(PointsConfig(num_points=6, views=1, elevation=90.0, image_size=9, splat=0))
    pts = torch.tensor([[0.0, 0, 1], [0, 0, -1], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]])
    img = ad(pts.unsqueeze(0))
    assert img.shape == (1, 3, 9, 9)
    assert img[0, 0, 4, 4] == 1.0 and img[0, 1, 4, 4] == 0.0 and img[0, 2, 4, 4] == 1.0  # near z=+1, far z=-1
    assert img[0, 2].sum() == 5  # the ±z pair shares the centre pixel
    rot = PointCloudAdapter(PointsConfig(num_points=6, test_rotations=4))
    assert rot.preprocess(pts).shape == (4, 6, 3)


def test_point_features_mlp_and_training_augmentation() -> None:
    ad = PointCloudAdapter(PointsConfig(num_points=64, in_features=2, mlp_dim=4, image_size=16))
    assert ad.out_channels == 3 + 2 + 4
    x = np.random.default_rng(0).random((300, 5))
    out = ad(ad.preprocess(x))
    assert out.shape == (4, 9, 16, 16)
    out.sum().backward()
    assert ad.mlp is not None and ad.mlp[0].weight.grad.abs().sum() > 0
    feat = out[:, 3:5]
    assert feat.min() >= 0 and feat.max() <= 1  # nearest point's features (inputs were in [0, 1))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = ad.preprocess(x, train=True, generator=g1), ad.preprocess(x, train=True, generator=g2)
    assert torch.equal(a, b) and not torch.equal(a, ad.preprocess(x))


def test_point_files(tmp_path) -> None:
    lib = o3d()
    box = lib.geometry.TriangleMesh.create_box(1.0, 2.0, 3.0)
    lib.io.write_triangle_mesh(str(tmp_path / "box.off"), box)
    lib.io.write_triangle_mesh(str(tmp_path / "box.ply"), box)
    lib.io.write_triangle_mesh(str(tmp_path / "box.obj"), box)
    cloud = lib.geometry.PointCloud(lib.utility.Vector3dVector(np.random.default_rng(0).random((500, 3))))
    for name in ("c.ply", "c.pcd", "c.xyz"):
        lib.io.write_point_cloud(str(tmp_path / name), cloud)
    np.save(tmp_path / "c.npy", np.asarray(cloud.points))
    np.savetxt(tmp_path / "c.csv", np.asarray(cloud.points), delimiter=",")
    ad = PointCloudAdapter(PointsConfig(num_points=256, mesh_points=2048))
    ref = ad.preprocess(np.asarray(cloud.points))
    for name in ("c.ply", "c.pcd", "c.xyz", "c.npy", "c.csv"):
        torch.testing.assert_close(ad.preprocess(tmp_path / name), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(ad.preprocess(cloud), ref, atol=1e-6, rtol=0)
    off, ply = ad.preprocess(tmp_path / "box.off"), ad.preprocess(str(tmp_path / "box.ply"))
    torch.testing.assert_close(off, ply)  # same mesh, seeded surface sampling
    torch.testing.assert_close(ad.preprocess(tmp_path / "box.obj"), off, atol=1e-5, rtol=0)
    # sampled points lie on the box's faces: some coordinate at its min/max
    raw = sample_mesh_surface(np.asarray(box.vertices), np.asarray(box.triangles), 400)
    on_face = np.isclose(raw, 0).any(1) | np.isclose(raw, [1, 2, 3]).any(1)
    assert on_face.all()
    assert ad.preprocess(box).shape == (1, 256, 3)


# ============================================================================================ series


def _hourly(n: int = 300, vars_: int = 2, start: str = "2024-01-01") -> pd.DataFrame:
    idx = pd.date_range(start, periods=n, freq="h")
    t = np.arange(n)
    data = {f"v{i}": 10 * i + np.sin(2 * np.pi * t / 24 + i) + 0.01 * t for i in range(vars_)}
    return pd.DataFrame(data, index=idx)


def test_series_windows_and_normalisation_round_trip() -> None:
    df = _hourly()
    ad = SeriesAdapter(SeriesConfig(lookback=96, num_variables=2))
    win, stats = ad.preprocess(df, return_stats=True)
    assert win.shape == (1, 96, 6) and ad.in_features == 6
    raw = torch.tensor(df.to_numpy()[-96:], dtype=torch.float32)
    torch.testing.assert_close(denormalize(win[0, :, :2], window_stats(stats, 0)), raw, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(win[..., :2].mean(1), torch.zeros(1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(win[..., :2].std(1, unbiased=False), torch.ones(1, 2), atol=1e-3, rtol=0)
    x = torch.randn(4, 50, 3) * 7 + 3
    torch.testing.assert_close(denormalize(*normalize(x)), x, atol=1e-5, rtol=1e-5)
    flat = torch.ones(1, 50, 1) * 5  # a constant window normalises to zeros, not NaN
    assert torch.equal(normalize(flat)[0], torch.zeros_like(flat))
    # classification-style windows: hop > 0, the last window ends at the last step
    hop = SeriesAdapter(SeriesConfig(lookback=96, num_variables=2, hop=50, normalize=False))
    w = hop.preprocess(df)
    assert w.shape == (5, 96, 6) and hop.window_starts(300) == [4, 54, 104, 154, 204]
    torch.testing.assert_close(w[-1, :, :2], raw)


def window_stats(stats, i):
    """Window ``i`` of a batched :class:`SeriesStats`."""
    return type(stats)(stats.mean[i], stats.std[i])


def test_series_calendar_features() -> None:
    idx = pd.DatetimeIndex(["2024-01-01 00:00", "2024-12-31 23:00", "2024-03-16 12:00"])  # Mon, Tue, Sat
    cal = calendar_features(idx)
    np.testing.assert_allclose(cal[0], [-0.5, -0.5, -0.5, -0.5])
    np.testing.assert_allclose(cal[1], [0.5, 1 / 6 - 0.5, 0.5, 365 / 365 - 0.5], atol=1e-6)
    assert cal.min() >= -0.5 and cal.max() <= 0.5
    arr = SeriesAdapter(SeriesConfig(lookback=10)).preprocess(np.arange(20.0))
    assert arr.shape == (1, 10, 5) and torch.equal(arr[0, :, 1:], torch.zeros(10, 4))  # no timestamps → zeros
    with_ts = SeriesAdapter(SeriesConfig(lookback=10)).preprocess(
        np.arange(20.0), timestamps=pd.date_range("2024-01-01", periods=20, freq="h")
    )
    np.testing.assert_allclose(with_ts[0, :, 1].numpy(), np.arange(10, 20) / 23 - 0.5, atol=1e-6)


def test_series_period_layout() -> None:
    t = np.arange(240)
    x = np.sin(2 * np.pi * t / 24)
    assert estimate_period(x) == 24
    assert estimate_period(x + 0.05 * t) == 24  # a trend does not hide the season
    ad = SeriesAdapter(SeriesConfig(lookback=96, calendar=False, layout="period"))
    img = ad(ad.preprocess(x))
    assert img.shape == (1, 1, 24, 4)  # period × cycles
    assert torch.allclose(img[0, 0, :, 0], img[0, 0, :, 3], atol=1e-5)  # same phase in every cycle
    seq = torch.arange(10.0).view(1, 10, 1)
    folded = fold_by_period(seq, 4)  # 3 cycles, 2 zeros padded at the front
    assert folded.shape == (1, 1, 4, 3)
    assert folded[0, 0, -1, -1] == 9 and folded[0, 0, 0, 0] == 0 and folded[0, 0, 2, 0] == 0
    assert folded[0, 0, :, 1].tolist() == [2, 3, 4, 5]
    fixed = SeriesAdapter(SeriesConfig(lookback=96, num_variables=2, period=12, layout="period"))
    assert fixed.out_channels == 6 and fixed(fixed.preprocess(_hourly())).shape == (1, 6, 12, 8)


def test_series_official_layout() -> None:
    ad = SeriesAdapter(SeriesConfig(lookback=96, num_variables=2, layout="official", d_model=24)).eval()
    assert ad.out_channels == 1
    win = ad.preprocess(_hourly())
    img = ad(win)
    assert img.shape == (1, 1, 48, 48)  # 96 · 24 = 48²
    emb = ad.value_embedding(win[..., :2].transpose(1, 2)).transpose(1, 2) + ad.time_embedding(win[..., 2:])
    # raw reshape: image row r holds time steps 2r and 2r+1 (48 / 24 = 2 per row)
    torch.testing.assert_close(img[0, 0, 5], torch.cat([emb[0, 10], emb[0, 11]]))
    with pytest.raises(InvalidInputError, match="square"):
        SeriesAdapter(SeriesConfig(lookback=96, layout="official", d_model=20))
    # d_model=0 (the default) picks the smallest width >= 16 that makes a square
    for lookback, width in ((96, 24), (100, 16), (208, 52), (97, 97), (10, 40)):
        auto = SeriesAdapter(SeriesConfig(lookback=lookback, calendar=False))
        assert auto.d_model == width
        side = math.isqrt(lookback * width)
        assert auto(torch.zeros(2, lookback, 1)).shape == (2, 1, side, side)
    off = SeriesConfig.official()
    assert (off.lookback, off.d_model, math.isqrt(off.lookback * off.d_model)) == (48, 768, 192)


def test_series_csv_and_index_types(tmp_path) -> None:
    df = _hourly(200, 2)
    csv = df.reset_index(names="date")
    csv.to_csv(tmp_path / "ett.csv", index=False)
    ad = SeriesAdapter(SeriesConfig(lookback=48, num_variables=2))
    ref = ad.preprocess(df)
    torch.testing.assert_close(ad.preprocess(tmp_path / "ett.csv"), ref)
    torch.testing.assert_close(ad.preprocess(csv), ref)
    torch.testing.assert_close(ad.preprocess(df.to_numpy(), timestamps=df.index), ref)
    monthly = pd.Series(np.arange(60.0), index=pd.period_range("2000-01", periods=60, freq="M"))
    assert SeriesAdapter(SeriesConfig(lookback=24)).preprocess(monthly).shape == (1, 24, 5)


# ============================================================================================ all adapters


def _samples(tmp_path):
    """(adapter, raw input, kwargs) per modality and layout."""
    frames = _coloured_frames(12, 40, 56)
    cloud = np.random.default_rng(0).random((400, 3))
    series = _hourly(150, 2)
    return [
        (AudioAdapter(), sine(700, 1.6, 22050), {"sample_rate": 22050}),
        (AudioAdapter(AudioConfig.official()), sine(700, 1.0, SR), {"sample_rate": SR}),
        (VideoAdapter(VideoConfig(num_frames=4, size=32)), frames, {}),
        (VideoAdapter(VideoConfig(num_frames=4, size=32, layout="official")), frames, {}),
        (VideoAdapter(VideoConfig(num_frames=4, size=32, layout="channels")), frames, {}),
        (PointCloudAdapter(PointsConfig(num_points=128, image_size=32)), cloud, {}),
        (
            PointCloudAdapter(PointsConfig(num_points=128, image_size=32, mlp_dim=3, maps=("depth",))),
            cloud,
            {},
        ),
        (SeriesAdapter(SeriesConfig(lookback=96, num_variables=2)), series, {}),
        (SeriesAdapter(SeriesConfig(lookback=96, num_variables=2, layout="period")), series, {}),
    ]


def test_config_round_trip_and_backbone_end_to_end(tmp_path) -> None:
    for ad, x, kw in _samples(tmp_path):
        ad.eval()
        cfg = json.loads(json.dumps(ad.get_config()))  # what a bundle stores
        rebuilt = build_adapter(**cfg).eval()
        assert type(rebuilt) is type(ad) and rebuilt.get_config() == ad.get_config()
        rebuilt.load_state_dict(ad.state_dict())
        p1, p2 = ad.preprocess(x, **kw), rebuilt.preprocess(x, **kw)
        assert torch.equal(p1, p2)
        batch = torch.cat([p1, p1])
        with torch.no_grad():
            img = ad(batch)
            assert torch.equal(img, rebuilt(batch))
            assert img.dim() == 4 and img.shape[0] == batch.shape[0] * ad.views
            assert img.shape[1] == ad.out_channels and torch.isfinite(img).all()
            feats = tiny_backbone(ad.out_channels)(img)
        assert feats.shape == (img.shape[0], 64), type(ad).__name__


def test_unknown_config_fields_are_rejected() -> None:
    with pytest.raises(InvalidInputError):
        build_adapter("audio", num_mels=64)
    assert isinstance(build_adapter("points", views=2), PointCloudAdapter)
    assert build_adapter("points", views=2).views == 2


# ============================================================================================ error tables
# One row per documented bad input: (id, adapter factory, input factory taking the media dir, kwargs, error type).
# The exact type is checked (UnsupportedFormatError is a subclass of InvalidInputError).


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory) -> Path:
    """Broken and edge-case files for the error tables, written once."""
    import soundfile as sf

    d = tmp_path_factory.mktemp("bad_media")
    sf.write(d / "ok.wav", sine(440, 1.0, SR), SR)
    data = (d / "ok.wav").read_bytes()
    (d / "trunc.wav").write_bytes(data[: len(data) // 2])
    (d / "garbage.wav").write_bytes(b"not audio at all" * 64)
    (d / "garbage.mp3").write_bytes(b"\x00\x01junk" * 64)
    (d / "empty.flac").write_bytes(b"")
    sf.write(d / "nosamples.wav", np.zeros((0, 1), np.float32), SR)
    write_audio_av(d / "full.mp3", sine(440, 2.0, 44100, channels=2), 44100, "libmp3lame")
    mp3 = (d / "full.mp3").read_bytes()
    (d / "trunc.mp3").write_bytes(mp3[: len(mp3) // 3])
    (d / "garbage.mp4").write_bytes(b"nothing to see" * 100)
    (d / "bad.ply").write_bytes(b"ply\nthis is not a ply file\n")
    (d / "bad.off").write_bytes(b"OFF\n3 1 0\n0 0\n")
    (d / "bad.npy").write_bytes(b"\x93NUMPY broken")
    (d / "c.abc").write_text("1 2 3\n")
    (d / "s.parquet").write_bytes(b"PAR1")
    return d


def _nan_at(shape, index, value=np.nan, dtype=np.float32) -> np.ndarray:
    x = np.zeros(shape, dtype) if dtype != np.float64 else np.random.default_rng(0).random(shape)
    x[index] = value
    return x


def _series_with(kind: str) -> pd.DataFrame:
    df = _hourly(120, 1)
    if kind == "reversed":
        return df.iloc[::-1]
    if kind == "duplicate":
        df = df.copy()
        df.index = df.index[[0, *range(len(df) - 1)]]
        return df
    if kind == "nan":
        df = df.copy()
        df.iloc[5, 0] = np.nan
        return df
    return df.assign(label="x")


_AUDIO = AudioAdapter
_VIDEO = lambda: VideoAdapter(VideoConfig(num_frames=4, size=8))  # noqa: E731
_POINTS = lambda: PointCloudAdapter(PointsConfig(num_points=16))  # noqa: E731
_SERIES = lambda: SeriesAdapter(SeriesConfig(lookback=96))  # noqa: E731
_I, _U = InvalidInputError, UnsupportedFormatError
_SR = {"sample_rate": SR}

ERROR_TABLE = [
    # audio
    ("audio-no-rate", _AUDIO, lambda d: np.zeros(SR), {}, _I),
    ("audio-zero-rate", _AUDIO, lambda d: np.zeros(SR), {"sample_rate": 0}, _I),
    ("audio-negative-rate", _AUDIO, lambda d: np.zeros(SR), {"sample_rate": -16000}, _I),
    ("audio-nan-rate", _AUDIO, lambda d: np.zeros(SR), {"sample_rate": float("nan")}, _I),
    ("audio-text-rate", _AUDIO, lambda d: np.zeros(SR), {"sample_rate": "fast"}, _I),
    ("audio-nan", _AUDIO, lambda d: _nan_at(SR, 10), _SR, _I),
    ("audio-inf", _AUDIO, lambda d: torch.from_numpy(_nan_at(SR, -1, np.inf)), _SR, _I),
    ("audio-empty", _AUDIO, lambda d: np.zeros(0), _SR, _I),
    ("audio-zero-length-stereo", _AUDIO, lambda d: np.zeros((2, 0)), _SR, _I),
    ("audio-3d", _AUDIO, lambda d: np.zeros((2, 2, SR)), _SR, _I),
    ("audio-strings", _AUDIO, lambda d: np.array(["a", "b"]), _SR, _I),
    ("audio-bool", _AUDIO, lambda d: np.ones(SR, bool), _SR, _I),
    ("audio-object", _AUDIO, lambda d: {"wave": 1}, _SR, _I),
    ("audio-unknown-kwarg", _AUDIO, lambda d: np.zeros(SR), {"sample_rate": SR, "rate": 3}, _I),
    ("audio-missing-file", _AUDIO, lambda d: d / "nope.wav", {}, _I),
    ("audio-empty-file", _AUDIO, lambda d: d / "empty.flac", {}, _I),
    ("audio-no-samples", _AUDIO, lambda d: d / "nosamples.wav", {}, _I),
    ("audio-truncated-wav", _AUDIO, lambda d: d / "trunc.wav", {}, _U),
    ("audio-truncated-mp3", _AUDIO, lambda d: d / "trunc.mp3", {}, _U),
    ("audio-garbage-wav", _AUDIO, lambda d: d / "garbage.wav", {}, _U),
    ("audio-garbage-mp3", _AUDIO, lambda d: d / "garbage.mp3", {}, _U),
    # video
    ("video-missing-file", _VIDEO, lambda d: d / "nope.mp4", {}, _I),
    ("video-garbage-file", _VIDEO, lambda d: d / "garbage.mp4", {}, _U),
    ("video-no-video-stream", _VIDEO, lambda d: d / "ok.wav", {}, _U),
    ("video-zero-frames", _VIDEO, lambda d: np.zeros((0, 8, 8, 3), np.uint8), {}, _I),
    ("video-nan", _VIDEO, lambda d: _nan_at((4, 8, 8, 3), (0, 0, 0, 0)), {}, _I),
    ("video-float-out-of-range", _VIDEO, lambda d: np.full((4, 8, 8, 3), 2.0, np.float32), {}, _I),
    ("video-rank-3", _VIDEO, lambda d: np.zeros((8, 8, 3), np.uint8), {}, _I),
    ("video-channels-first", _VIDEO, lambda d: torch.zeros(4, 3, 8, 8, dtype=torch.uint8), {}, _I),
    ("video-int16", _VIDEO, lambda d: np.zeros((4, 8, 8, 3), np.int16), {}, _I),
    ("video-not-a-video", _VIDEO, lambda d: 3.5, {}, _I),
    # points
    ("points-zero", _POINTS, lambda d: np.zeros((0, 3)), {}, _I),
    ("points-one", _POINTS, lambda d: np.ones((1, 3)), {}, _I),
    ("points-coincident", _POINTS, lambda d: np.ones((10, 3)), {}, _I),
    ("points-nan", _POINTS, lambda d: _nan_at((20, 3), (3, 1), dtype=np.float64), {}, _I),
    ("points-inf", _POINTS, lambda d: torch.from_numpy(_nan_at((20, 3), (3, 1), np.inf, np.float64)), {}, _I),
    ("points-two-columns", _POINTS, lambda d: np.zeros((10, 2)), {}, _I),
    ("points-3xN", _POINTS, lambda d: np.random.default_rng(0).random((3, 50)), {}, _I),
    ("points-1d", _POINTS, lambda d: np.zeros(9), {}, _I),
    ("points-3d", _POINTS, lambda d: np.zeros((2, 10, 3)), {}, _I),
    ("points-strings", _POINTS, lambda d: np.array([["a", "b", "c"]] * 4), {}, _I),
    ("points-unknown-kwarg", _POINTS, lambda d: np.random.default_rng(0).random((10, 3)), {"seed": 1}, _I),
    (
        "points-missing-features",
        lambda: PointCloudAdapter(PointsConfig(in_features=2)),
        lambda d: np.random.default_rng(0).random((10, 4)),
        {},
        _I,
    ),
    ("points-missing-file", _POINTS, lambda d: d / "nope.ply", {}, _I),
    ("points-corrupt-ply", _POINTS, lambda d: d / "bad.ply", {}, _U),
    ("points-corrupt-off", _POINTS, lambda d: d / "bad.off", {}, _U),
    ("points-corrupt-npy", _POINTS, lambda d: d / "bad.npy", {}, _U),
    ("points-unknown-suffix", _POINTS, lambda d: d / "c.abc", {}, _U),
    # series
    ("series-too-short", _SERIES, lambda d: _hourly(50, 1), {}, _I),
    ("series-non-monotonic", _SERIES, lambda d: _series_with("reversed"), {}, _I),
    ("series-duplicate-timestamps", _SERIES, lambda d: _series_with("duplicate"), {}, _I),
    ("series-nan", _SERIES, lambda d: _series_with("nan"), {}, _I),
    ("series-inf", _SERIES, lambda d: np.full(100, np.inf), {}, _I),
    ("series-3d", _SERIES, lambda d: np.zeros((2, 100, 1)), {}, _I),
    ("series-wrong-variables", _SERIES, lambda d: np.zeros((100, 3)), {}, _I),
    ("series-NxT", _SERIES, lambda d: np.zeros((1, 100)), {}, _I),
    ("series-non-numeric-column", _SERIES, lambda d: _series_with("text"), {}, _I),
    ("series-empty", _SERIES, lambda d: np.zeros((0, 1)), {}, _I),
    ("series-strings", _SERIES, lambda d: np.array(["1", "2"]), {}, _I),
    ("series-object", _SERIES, lambda d: {"a": 1}, {}, _I),
    ("series-bad-timestamps", _SERIES, lambda d: np.zeros(100), {"timestamps": ["x"] * 100}, _I),
    (
        "series-timestamp-count",
        _SERIES,
        lambda d: np.zeros(100),
        {"timestamps": pd.date_range("2024", periods=5)},
        _I,
    ),
    ("series-missing-file", _SERIES, lambda d: d / "nope.csv", {}, _I),
    ("series-unsupported-file", _SERIES, lambda d: d / "s.parquet", {}, _U),
]


@pytest.mark.parametrize(
    ("make_adapter", "make_input", "kwargs", "error"),
    [r[1:] for r in ERROR_TABLE],
    ids=[r[0] for r in ERROR_TABLE],
)
def test_error_table(bad_media, make_adapter, make_input, kwargs, error) -> None:
    with pytest.raises(error) as info:
        make_adapter().preprocess(make_input(bad_media), **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert len(str(info.value)) > 20  # a message that says something


def test_error_messages_hint_at_transposed_layouts() -> None:
    with pytest.raises(InvalidInputError, match="transpose"):
        SeriesAdapter(SeriesConfig(lookback=10, num_variables=3)).preprocess(np.zeros((3, 100)))
    with pytest.raises(InvalidInputError, match="transpose"):
        PointCloudAdapter().preprocess(np.zeros((3, 100)))
    with pytest.raises(InvalidInputError, match="permute"):
        VideoAdapter().preprocess(np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(InvalidInputError, match="sample_rate="):
        AudioAdapter().preprocess(np.zeros(100))


BAD_BATCHES = [
    ("audio", AudioAdapter, torch.zeros(2, 3, 128, 98)),
    ("video", lambda: VideoAdapter(VideoConfig(num_frames=4, size=8)), torch.zeros(1, 3, 5, 8, 8)),
    ("points", lambda: PointCloudAdapter(PointsConfig(num_points=16)), torch.zeros(2, 16, 4)),
    ("series", lambda: SeriesAdapter(SeriesConfig(lookback=96)), torch.zeros(2, 50, 5)),
]


@pytest.mark.parametrize(
    ("make_adapter", "batch"), [r[1:] for r in BAD_BATCHES], ids=[r[0] for r in BAD_BATCHES]
)
def test_embedding_rejects_wrong_batch_shapes(make_adapter, batch) -> None:
    with pytest.raises(InvalidInputError):
        make_adapter()(batch)


BAD_CONFIGS = [
    ("video-layout", "video", {"layout": "mosaic"}),
    ("video-official-non-square-T", "video", {"num_frames": 8, "layout": "official"}),
    ("video-crops", "video", {"num_crops": 2}),
    ("points-map", "points", {"maps": ["depth", "colour"]}),
    ("points-up-axis", "points", {"up_axis": "w"}),
    ("points-no-channels", "points", {"maps": []}),
    ("series-layout", "series", {"layout": "square"}),
    ("series-official-non-square", "series", {"layout": "official", "d_model": 20}),
    ("audio-rate", "audio", {"sample_rate": 0}),
    ("audio-unknown-field", "audio", {"num_mels": 64}),
]


@pytest.mark.parametrize(
    ("modality", "config"), [r[1:] for r in BAD_CONFIGS], ids=[r[0] for r in BAD_CONFIGS]
)
def test_bad_configs_are_rejected(modality, config) -> None:
    with pytest.raises(InvalidInputError):
        build_adapter(modality, **config)
