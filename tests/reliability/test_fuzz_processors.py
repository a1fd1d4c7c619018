"""Property-based fuzzing of every adapter's processor (audio, video, points, series, image).

The promise: whatever a processor is given — arrays/tensors of any shape and dtype (int, float, bool, complex)
with NaN/Inf, empty or huge values, random bytes saved under a media extension, real files cut short or with
flipped bits — it either returns a finite float32 tensor of the documented shape or raises
``InvalidInputError`` (``UnsupportedFormatError`` for files it cannot decode) with a message. Nothing else
escapes (no raw ValueError/RuntimeError/PyAV/PIL/Open3D errors), and no example may take longer than the
deadline. ``UNIPERCEPTION_FUZZ_EXAMPLES`` sets the examples per test (CI default 40).
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from _reliability import FUZZ_DEADLINE_S, FUZZ_EXAMPLES, record, sine, write_audio_av, write_video_av
from hypothesis import HealthCheck, settings
from hypothesis import given as hgiven
from hypothesis import strategies as st

from uniperception.adapters import (
    AudioAdapter,
    AudioConfig,
    ImageAdapter,
    ImageConfig,
    PointCloudAdapter,
    PointsConfig,
    SeriesAdapter,
    SeriesConfig,
    VideoAdapter,
    VideoConfig,
)
from uniperception.errors import InvalidInputError

pytestmark = pytest.mark.timeout(240)

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=timedelta(seconds=FUZZ_DEADLINE_S),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)

DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "bool", "complex64", "complex128"]
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 255.0, 1e-45, 1e38, -3.4e38, 1e300]
SCALES = [1.0, 1e-3, 0.5, 255.0, 1e4, 1e20, 1e38, 1e300]


def check(test: str, fn: Any, shape: tuple[int | None, ...]) -> torch.Tensor | None:
    """Run one processor call: a valid output (finite float32 of ``shape``, None = any ≥ 1) or a documented error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warnings are allowed (e.g. "rounded the sample rate"); errors are not
            out = fn()
    except InvalidInputError as e:  # UnsupportedFormatError is a subclass
        assert len(str(e)) > 15, f"an error without a useful message: {e!r}"
        record(test, f"rejected ({type(e).__name__})")
        return None
    assert isinstance(out, torch.Tensor), type(out)
    assert out.dtype == torch.float32, out.dtype
    assert len(out.shape) == len(shape) and all(
        (s >= 1) if e is None else s == e for s, e in zip(out.shape, shape, strict=True)
    ), f"shape {tuple(out.shape)}, documented {shape}"
    assert torch.isfinite(out).all(), "the processor returned NaN/Inf"
    record(test, "valid output")
    return out


# ------------------------------------------------------------------------------------------------ arrays
@st.composite
def arrays(draw: Any, shape: tuple[int, ...], unit_floats: bool = False, allow_tensor: bool = True) -> Any:
    """An array (or tensor) of ``shape``: a random dtype, random content at a random scale, a few special values,
    sometimes Fortran-ordered; ``unit_floats`` makes floats in [0, 1] likely (what images/videos accept).

    Half the draws are "clean" (a common dtype, moderate values, no specials) so that valid inputs, and not only
    rejections, are exercised."""
    clean = draw(st.booleans())
    dtype = np.dtype(draw(st.sampled_from(["uint8", "int16", "float32", "float64"] if clean else DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "unit", "constant", "ramp"] + ["unit"] * (3 * unit_floats)))
    scale = draw(st.sampled_from(SCALES[:4] if clean else SCALES))
    if kind == "normal":
        base = rng.standard_normal(shape) * scale
    elif kind == "unit":
        base = rng.random(shape) * (255.0 if dtype.kind in "iu" else 1.0)
    elif kind == "constant":
        base = np.full(shape, draw(st.sampled_from(SPECIALS[3:9])))
    else:
        base = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * scale
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            arr = np.clip(np.nan_to_num(base), info.min, info.max).astype(dtype)
        elif dtype.kind == "b":
            arr = base > 0.5
        elif dtype.kind == "c":
            arr = (base + 1j * rng.standard_normal(shape)).astype(dtype)
        else:
            arr = base.astype(dtype)
        if arr.size and dtype.kind in "fc" and not clean:
            for _ in range(draw(st.integers(0, 3))):
                arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(SPECIALS))
    if draw(st.booleans()):
        arr = np.asfortranarray(arr)
    if allow_tensor and draw(st.booleans()):
        try:
            return torch.from_numpy(np.ascontiguousarray(arr))
        except TypeError:  # a dtype torch cannot hold
            return arr
    return arr


def or_object(strategy: Any, objects: list[Any]) -> Any:
    """``strategy`` nine times in ten, else one of ``objects`` (things that are not arrays at all)."""
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda obj: st.sampled_from(objects) if obj else strategy)


def size(hi: int, lo: int = 1) -> Any:
    """A length in ``[lo, hi]``, or 0 one time in ten (hypothesis alone would pick the boundary far more often)."""
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda empty: st.just(0) if empty else st.integers(lo, hi))


@st.composite
def audio_case(draw: Any) -> tuple[Any, Any]:
    rate = draw(st.one_of(
        st.sampled_from([16000, 8000, 44100, 48000, 22050]),
        st.integers(1, 400_000),
        st.floats(0.1, 400_000),
        st.sampled_from([0, -16000, float("nan"), float("inf"), None, "16000", 44101, 7999, 10**12]),
    ))
    try:
        r = float(rate)  # bound the recording to ≤ 30 s of signal so a case stays cheap
        n_max = int(min(48_000, max(1.0, 30 * r))) if np.isfinite(r) and r > 0 else 48_000
    except (TypeError, ValueError):
        n_max = 48_000
    n = draw(size(n_max))
    channels = draw(size(5))
    shape = draw(st.sampled_from([(n,), (channels, n), (n, channels), (channels, channels, n % 7), ()]))
    form = draw(st.sampled_from(["array"] * 6 + ["pair", "list", "object"]))
    if form == "object":
        return draw(st.sampled_from([None, {"wave": 1}, b"RIFF", 3.5, "no/such/file.wav", [[1, 2], [3]]])), rate
    x = draw(arrays(shape if len(shape) else (1,)))
    if form == "pair":
        return (x, rate), None
    if form == "list":
        return np.asarray(x).tolist(), rate
    return x, rate


@FUZZ
@hgiven(case=audio_case(), official=st.booleans(), train=st.booleans())
def test_fuzz_audio_arrays(case: tuple[Any, Any], official: bool, train: bool) -> None:
    ad = AudioAdapter(AudioConfig.official() if official else AudioConfig())
    x, rate = case
    kw = {} if rate is None else {"sample_rate": rate}
    check("fuzz/audio-arrays", lambda: ad.preprocess(x, train=train, generator=torch.Generator().manual_seed(0), **kw),
          (None, 1, 128, ad.config.num_frames()))


@st.composite
def video_case(draw: Any) -> tuple[VideoConfig, Any, bool]:
    cfg = VideoConfig(
        num_frames=draw(st.integers(1, 6)), size=draw(st.integers(1, 12)),
        short_side=draw(st.one_of(st.none(), st.integers(1, 16))), frame_stride=draw(st.integers(0, 3)),
        num_clips=draw(st.integers(1, 2)), num_crops=draw(st.sampled_from([1, 3])),
    )
    t, h, w = draw(size(10)), draw(size(24)), draw(size(24))
    shape = draw(st.sampled_from([(t, h, w, 3)] * 8 + [(t, h, w, 1), (t, 3, h, w), (h, w, 3), (t, h, w, 3, 1)]))
    x = draw(or_object(arrays(shape, unit_floats=True), [None, 3.5, [1, 2, 3], b"\x00"]))
    return cfg, x, draw(st.booleans())


@FUZZ
@hgiven(case=video_case())
def test_fuzz_video_arrays(case: tuple[VideoConfig, Any, bool]) -> None:
    cfg, x, train = case
    ad = VideoAdapter(cfg)
    pieces = 1 if train else cfg.num_clips * cfg.num_crops
    check("fuzz/video-arrays", lambda: ad.preprocess(x, train=train, generator=torch.Generator().manual_seed(0)),
          (pieces, 3, cfg.num_frames, cfg.size, cfg.size))


@st.composite
def points_case(draw: Any) -> tuple[PointsConfig, Any, bool]:
    cfg = PointsConfig(
        num_points=draw(st.integers(1, 48)), in_features=draw(st.integers(0, 2)),
        test_rotations=draw(st.integers(1, 3)), up_axis=draw(st.sampled_from("xyz")), jitter=0.01,
    )
    n, d = draw(size(3000)), draw(size(7))
    shape = draw(st.sampled_from([(n, 3)] * 3 + [(n, 3 + cfg.in_features)] * 3 + [(n, d), (d, n), (n,), (2, n, 3)]))
    x = draw(or_object(arrays(shape), [None, 3.5, [[1, 2, 3], [4, 5]], "nope.ply"]))
    return cfg, x, draw(st.booleans())


@FUZZ
@hgiven(case=points_case())
def test_fuzz_points_arrays(case: tuple[PointsConfig, Any, bool]) -> None:
    cfg, x, train = case
    ad = PointCloudAdapter(cfg)
    check("fuzz/points-arrays", lambda: ad.preprocess(x, train=train, generator=torch.Generator().manual_seed(0)),
          (1 if train else cfg.test_rotations, cfg.num_points, 3 + cfg.in_features))


@st.composite
def series_case(draw: Any) -> tuple[SeriesConfig, Any, dict[str, Any]]:
    cfg = SeriesConfig(
        lookback=draw(st.integers(2, 48)), num_variables=draw(st.integers(1, 3)), layout="period",
        normalize=draw(st.booleans()), calendar=draw(st.booleans()), hop=draw(st.integers(0, 16)),
    )
    t = draw(size(400))
    if draw(st.sampled_from([True, True, False])):  # mostly long enough for the lookback window
        t = max(t, cfg.lookback + t % 50)
    n = draw(st.sampled_from([cfg.num_variables] * 4 + [1, 2, 4]))
    x = draw(arrays((t, n) if draw(st.booleans()) or n > 1 else (t,)))
    kw: dict[str, Any] = {}
    form = draw(st.sampled_from(["array"] * 3 + ["frame"] * 3 + ["timestamps"] * 2 + ["object"]))
    if form == "object":
        return cfg, draw(st.sampled_from([None, {"a": 1}, 3.5, "no/such.csv", [[1, 2], [3]]])), kw
    if form in ("frame", "timestamps") and np.asarray(x).dtype.kind in "iuf":
        freq = draw(st.sampled_from(["h", "D", "15min", "s"]))
        index = pd.date_range(draw(st.sampled_from(["2024-01-01", "1677-09-22", "2262-04-10"])), periods=t,
                              freq=freq, unit="s")
        order = draw(st.sampled_from(["sorted"] * 3 + ["reversed", "duplicate", "shuffled"]))
        if t > 1 and order == "reversed":
            index = index[::-1]
        elif t > 1 and order == "duplicate":
            index = index[[0, *range(t - 1)]]
        elif t > 1 and order == "shuffled":
            index = index[np.random.default_rng(t).permutation(t)]
        if form == "frame":
            x = pd.DataFrame(np.asarray(x).reshape(t, -1) if t else np.zeros((0, n)), index=index)
        else:
            kw["timestamps"] = index
    return cfg, x, kw


@FUZZ
@hgiven(case=series_case())
def test_fuzz_series_arrays(case: tuple[SeriesConfig, Any, dict[str, Any]]) -> None:
    cfg, x, kw = case
    ad = SeriesAdapter(cfg)
    t = len(x) if hasattr(x, "__len__") else 0
    windows = len(ad.window_starts(t)) if t >= cfg.lookback else None
    check("fuzz/series-arrays", lambda: ad.preprocess(x, **kw),
          (windows, cfg.lookback, cfg.num_variables + (4 if cfg.calendar else 0)))


@st.composite
def image_case(draw: Any) -> tuple[ImageConfig, Any]:
    cfg = ImageConfig(size=draw(st.integers(1, 24)), crop_pct=draw(st.floats(0.3, 1.2)))
    h, w, c = draw(size(40)), draw(size(40)), draw(size(5))
    shape = draw(st.sampled_from([(h, w, 3), (h, w, c), (h, w), (c, h, w), (h,), (2, h, w, 3)]))
    x = draw(or_object(arrays(shape, unit_floats=True), [None, 3.5, [[1, 2], [3, 4]], "no.png"]))
    return cfg, x


@FUZZ
@hgiven(case=image_case())
def test_fuzz_image_arrays(case: tuple[ImageConfig, Any]) -> None:
    cfg, x = case
    ad = ImageAdapter(cfg)
    check("fuzz/image-arrays", lambda: ad.preprocess(x), (1, 3, cfg.size, cfg.size))


# ------------------------------------------------------------------------------------------------ files
@functools.cache
def _adapters() -> dict[str, Any]:
    return {
        "audio": AudioAdapter(),
        "video": VideoAdapter(VideoConfig(num_frames=4, size=8)),
        "points": PointCloudAdapter(PointsConfig(num_points=16, mesh_points=64)),
        "series": SeriesAdapter(SeriesConfig(lookback=8, layout="period")),
        "image": ImageAdapter(ImageConfig(size=16)),
    }


SHAPES = {
    "audio": (None, 1, 128, 98), "video": (1, 3, 4, 8, 8), "points": (1, 16, 3),
    "series": (1, 8, 5), "image": (1, 3, 16, 16),
}
EXTENSIONS = {
    "audio": [".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus"],
    "video": [".mp4", ".avi", ".mkv", ".webm", ".mov"],
    "points": [".ply", ".pcd", ".off", ".xyz", ".pts", ".obj", ".stl", ".npy", ".txt", ".csv"],
    "series": [".csv", ".txt", ".tsv"],
    "image": [".png", ".jpg", ".bmp", ".gif", ".webp", ".tiff"],
}
MAGIC = [b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"ID3\x03\x00", b"OggS", b"\x00\x00\x00\x18ftypmp42",
         b"\x1aE\xdf\xa3", b"RIFF\x00\x00\x00\x00AVI ", b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n",
         b"ply\nformat binary_little_endian 1.0\nelement vertex 100\nproperty float x\nproperty float y\n"
         b"property float z\nelement face 2\nproperty list uchar int vertex_indices\nend_header\n",
         b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 5\nPOINTS 5\nDATA binary\n",
         b"OFF\n", b"\x93NUMPY\x01\x00", b"date,v\n2024-01-01,1\n", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
         b"BM", b"GIF89a", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@pytest.fixture(scope="module")
def fuzz_dir() -> Any:
    with tempfile.TemporaryDirectory(prefix="uniperception-fuzz-") as d:
        yield Path(d)


@FUZZ
@hgiven(modality=st.sampled_from(sorted(EXTENSIONS)), data=st.data(),
        magic=st.sampled_from(MAGIC), payload=st.binary(max_size=4096))
def test_fuzz_random_bytes_files(fuzz_dir: Path, modality: str, data: Any, magic: bytes, payload: bytes) -> None:
    ext = data.draw(st.sampled_from(EXTENSIONS[modality]))
    path = fuzz_dir / f"random{ext}"
    path.write_bytes(magic + payload)
    ad = _adapters()[modality]
    check(f"fuzz/random-bytes-files/{modality}", lambda: ad.preprocess(path), SHAPES[modality])


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """One small real file per format, generated with the libraries the adapters read them with."""
    import soundfile as sf
    from PIL import Image

    from uniperception.adapters.points import _import_open3d

    d = tmp_path_factory.mktemp("real_media")
    files: dict[str, list[Path]] = {m: [] for m in EXTENSIONS}
    x = sine(440, 0.6, 16000, channels=2)
    sf.write(d / "a.wav", x, 16000)
    sf.write(d / "a_float.wav", x, 16000, subtype="FLOAT")
    sf.write(d / "a.flac", sine(440, 0.6, 22050), 22050)
    write_audio_av(d / "a.mp3", sine(440, 0.6, 44100, channels=2), 44100, "libmp3lame")
    write_audio_av(d / "a.ogg", sine(440, 0.6, 48000), 48000, "libopus")
    files["audio"] += [d / n for n in ("a.wav", "a_float.wav", "a.flac", "a.mp3", "a.ogg")]
    frames = [np.full((24, 32, 3), (10 * i) % 255, np.uint8) for i in range(12)]
    write_video_av(d / "v.mp4", frames, (24, 32))
    write_video_av(d / "v.avi", frames, (24, 32), codec="mpeg4")
    write_video_av(d / "v.mkv", frames, (24, 32))
    files["video"] += [d / "v.mp4", d / "v.avi", d / "v.mkv"]
    o3d = _import_open3d()
    box = o3d.geometry.TriangleMesh.create_box(1.0, 2.0, 3.0)
    box.compute_triangle_normals()
    for n in ("m.off", "m.ply", "m.obj", "m.stl"):
        o3d.io.write_triangle_mesh(str(d / n), box)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.random.default_rng(0).random((60, 3))))
    for n in ("c.ply", "c.pcd", "c.xyz", "c.pts"):
        o3d.io.write_point_cloud(str(d / n), cloud)
    o3d.io.write_point_cloud(str(d / "cb.ply"), cloud, write_ascii=False)
    o3d.io.write_point_cloud(str(d / "cb.pcd"), cloud, write_ascii=False, compressed=True)
    np.save(d / "c.npy", np.asarray(cloud.points))
    np.savetxt(d / "c.csv", np.asarray(cloud.points), delimiter=",")
    files["points"] += [d / n for n in ("m.off", "m.ply", "m.obj", "m.stl", "c.ply", "c.pcd", "c.xyz", "c.pts",
                                        "cb.ply", "cb.pcd", "c.npy", "c.csv")]
    pd.DataFrame({"date": pd.date_range("2024", periods=30, freq="h"), "v": np.sin(np.arange(30.0))}).to_csv(
        d / "s.csv", index=False)
    files["series"].append(d / "s.csv")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    for ext in ("png", "jpg", "bmp", "gif", "webp", "tiff"):
        img.save(d / f"i.{ext}")
        files["image"].append(d / f"i.{ext}")
    ads = _adapters()
    for modality, paths in files.items():  # the intact files are valid inputs (the mutations start from them)
        for p in paths:
            assert p.stat().st_size > 0, p
            assert check(f"fuzz/intact-files/{modality}", lambda p=p, m=modality: ads[m].preprocess(p),
                         SHAPES[modality]) is not None, p
    return files


@FUZZ
@hgiven(data=st.data(), modality=st.sampled_from(sorted(EXTENSIONS)),
        mode=st.sampled_from(["truncate", "flip", "flips", "truncate+flip"]))
def test_fuzz_truncated_and_bitflipped_real_files(
    fuzz_dir: Path, real_files: dict[str, list[Path]], data: Any, modality: str, mode: str
) -> None:
    src = data.draw(st.sampled_from(real_files[modality]))
    buf = bytearray(src.read_bytes())
    if "truncate" in mode:
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    if "flip" in mode and buf:
        for _ in range(1 if mode != "flips" else data.draw(st.integers(2, 20))):
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = fuzz_dir / f"mutated{src.suffix}"
    path.write_bytes(bytes(buf))
    ad = _adapters()[modality]
    check(f"fuzz/mutated-real-files/{modality}/{mode}", lambda: ad.preprocess(path), SHAPES[modality])


@FUZZ
@hgiven(data=st.data())
def test_fuzz_truncated_wav_and_flac_are_always_rejected(
    fuzz_dir: Path, real_files: dict[str, list[Path]], data: Any
) -> None:
    """Formats that declare their length never pass a cut copy off as a (shorter) valid recording."""
    src = data.draw(st.sampled_from([p for p in real_files["audio"] if p.suffix in (".wav", ".flac")]))
    whole = src.read_bytes()
    path = fuzz_dir / f"cut{src.suffix}"
    path.write_bytes(whole[: data.draw(st.integers(0, len(whole) - 1))])
    with pytest.raises(InvalidInputError):
        AudioAdapter().preprocess(path)
    record("fuzz/truncated-wav-flac", "rejected")
