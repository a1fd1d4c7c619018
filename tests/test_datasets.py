"""Tests of uniperception.datasets: generated datasets (tiny, into tmp caches), folder loaders, time series.

Tests that need system tools skip with the reason when a tool is absent; CI installs them from
``.ci/apt-packages.txt`` (espeak-ng, sox, flite; libcgal-demo is fetched with ``apt-get download``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from uniperception.datasets import (
    DIRECTIONS,
    DISTRACTOR_WORDS,
    KEYWORD_CLASSES,
    SHAPE_CLASSES,
    KeywordSpeech,
    MissingDependencyError,
    ModelNet,
    MovingSprites,
    Shapes,
    SpeechCommands,
    VideoFolder,
    WindowDataset,
    cache_dir,
    keywords,
    list_voices,
    load_classification,
    load_ett_csv,
    load_mesh_points,
    load_series,
    read_video_frames,
    sample_shape,
    uniform_indices,
    voice_split,
    write_mp4,
)
from uniperception.datasets._common import atomic_directory
from uniperception.datasets.keywords import FESTIVAL_VOICES
from uniperception.errors import InvalidInputError, UnsupportedFormatError

HAS_ESPEAK = shutil.which("espeak-ng") is not None and shutil.which("sox") is not None
HAS_FLITE = shutil.which("flite") is not None and shutil.which("sox") is not None
needs_espeak = pytest.mark.skipif(
    not HAS_ESPEAK, reason="espeak-ng/sox not installed (apt-get install espeak-ng sox)"
)
needs_flite = pytest.mark.skipif(not HAS_FLITE, reason="flite/sox not installed (apt-get install flite sox)")
HAS_FESTIVAL = all(shutil.which(t) for t in ("festival", "text2wave", "sox")) and {
    v[0] for v in keywords._FESTIVAL.values()
} <= keywords._festival_voices()
needs_festival = pytest.mark.skipif(not HAS_FESTIVAL, reason=f"festival or its voices missing ({keywords._INSTALL})")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ``$UNIPERCEPTION_CACHE`` for the test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("UNIPERCEPTION_CACHE", str(d))
    return d


def _digest(folder: Path, pattern: str) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob(pattern))
    }


# ------------------------------------------------------------------------------------------------- cache plumbing


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UNIPERCEPTION_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UNIPERCEPTION_CACHE")
    assert cache_dir() == Path("~/.cache/uniperception").expanduser()


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(final) as tmp:
        (tmp / "half.wav").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    # a temporary folder of a dead process (an interrupted generation) is cleaned up by the next one
    stale = tmp_path / ".ds.tmp-999999999-abc"
    stale.mkdir()
    with atomic_directory(final) as tmp:
        (tmp / "ok").write_text("1")
    assert (final / "ok").read_text() == "1"
    assert not stale.exists()


# --------------------------------------------------------------------------------------------------- keywords


def test_voice_split_is_disjoint_and_covers_every_voice() -> None:
    for synth in ("espeak", "flite"):
        split = voice_split(synth)
        assert sorted(split) == sorted(list_voices(synth))
        groups = {s: {v for v, t in split.items() if t == s} for s in ("train", "val", "test")}
        assert all(groups.values())
        assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"]
    esp = voice_split("espeak")
    assert len(esp) == 126
    for s in ("train", "val", "test"):  # every accent is represented in every split
        assert len({v.split("+")[0] for v, t in esp.items() if t == s}) == 7
    # kal and kal16 are one speaker
    fl = voice_split("flite")
    assert fl["kal"] == fl["kal16"]
    # strict mode: a variant (timbre) never appears in two splits
    strict = voice_split("espeak", split_by="variant")
    by_variant: dict[str, set[str]] = {}
    for v, t in strict.items():
        by_variant.setdefault(v.split("+")[1], set()).add(t)
    assert all(len(s) == 1 for s in by_variant.values())
    assert voice_split("espeak", split_seed=1) != esp


@needs_espeak
def test_keywords_generation_shapes_labels_and_voices(cache: Path) -> None:
    ds = KeywordSpeech(split="train", num_per_class=2, seed=3, progress=False)
    assert ds.path.parent == cache / "datasets" / "keywords"
    assert len(ds) == 2 * len(KEYWORD_CLASSES) == 24
    assert ds.classes == (*"yes no up down left right on off stop go".split(), "_silence_", "_unknown_")
    assert sorted(set(ds.targets)) == list(range(12))
    train_voices = {v for v, s in voice_split("espeak").items() if s == "train"}
    for i in range(len(ds)):
        wav, sr, label = ds[i]
        row = ds.samples[i]
        assert wav.dtype == torch.float32 and wav.shape == (1, 16000) and sr == 16000
        assert sf.info(str(ds.path / row["file"])).frames == 16000
        assert row["voice"] in train_voices
        assert float(wav.abs().max()) <= 1.0
        name = KEYWORD_CLASSES[label]
        if name == "_silence_":
            assert row["word"] == ""
        else:
            assert row["word"] == name or (name == "_unknown_" and row["word"] in DISTRACTOR_WORDS)
            start, n = int(row["offset"]), int(row["word_samples"])
            assert 0 <= start and 0 < n and start + n <= 16000  # the whole word is inside the clip
            inside = wav[0, start : start + n].pow(2).mean()
            outside = torch.cat([wav[0, :start], wav[0, start + n :]]).pow(2).mean() if n < 16000 else 0.0
            assert inside > outside  # the speech is where the manifest says
    # re-opening uses the cache: nothing regenerated
    mtime = (ds.path / "manifest.csv").stat().st_mtime_ns
    again = KeywordSpeech(split="train", num_per_class=2, seed=3, progress=False)
    assert again.path == ds.path and (ds.path / "manifest.csv").stat().st_mtime_ns == mtime
    # changing a generation parameter means a different folder
    other = KeywordSpeech(split="train", num_per_class=1, seed=3, speed_range=(150, 160), progress=False)
    assert other.path != ds.path and len(other) == 12
    assert {int(r["speed"]) for r in other.samples} <= set(range(150, 161))
    assert not list(ds.path.parent.glob(".*tmp*"))  # no temporary folders left behind


@needs_espeak
def test_keywords_are_deterministic_and_split_by_voice(tmp_path: Path) -> None:
    a = KeywordSpeech(tmp_path / "a", split="train", num_per_class=1, seed=7, num_workers=2, progress=False)
    b = KeywordSpeech(tmp_path / "b", split="train", num_per_class=1, seed=7, num_workers=1, progress=False)
    da, db = _digest(a.path, "*.wav"), _digest(b.path, "*.wav")
    assert len(da) == 12 and da == db  # same seed: identical bytes (whatever the number of workers)
    assert (a.path / "manifest.csv").read_bytes() == (b.path / "manifest.csv").read_bytes()
    c = KeywordSpeech(tmp_path / "a", split="train", num_per_class=1, seed=8, progress=False)
    assert _digest(c.path, "*.wav") != da
    test = KeywordSpeech(tmp_path / "a", split="test", num_per_class=2, seed=7, progress=False)
    assert {r["voice"] for r in test.samples}.isdisjoint({r["voice"] for r in a.samples + c.samples})
    assert set(test.voices).isdisjoint(a.voices)


@needs_flite
def test_keywords_flite_variant(cache: Path) -> None:
    ds = KeywordSpeech(split="all", synth="flite", num_per_class=1, progress=False)
    assert len(ds) == 12 and set(ds.voices) == {"kal", "kal16", "awb", "rms", "slt"}
    assert {r["voice"] for r in ds.samples} <= set(ds.voices)
    wav, sr, _ = ds[0]
    assert wav.shape == (1, 16000) and sr == 16000 and float(wav.abs().max()) > 0.01


@needs_festival
def test_keywords_festival_is_a_training_only_source(cache: Path) -> None:
    assert voice_split("festival") == dict.fromkeys(FESTIVAL_VOICES, "train")
    ds = KeywordSpeech(split="train", synth="festival", num_per_class=1, seed=2, progress=False)
    assert len(ds) == 12 and ds.voices == list(FESTIVAL_VOICES) and {r["voice"] for r in ds.samples} <= set(ds.voices)
    wav, sr, _ = ds[0]
    assert wav.shape == (1, 16000) and sr == 16000 and float(wav.abs().max()) > 0.01
    # a different stream from espeak's with the same seed: the festival clips are not espeak's parameters
    esp = KeywordSpeech(split="train", num_per_class=1, seed=2, progress=False) if HAS_ESPEAK else None
    if esp is not None:
        assert [r["speed"] for r in esp.samples] != [r["speed"] for r in ds.samples]
    with pytest.raises(InvalidInputError, match="no 'test' voices"):
        KeywordSpeech(split="test", synth="festival", progress=False)


def test_keywords_festival_respellings_cover_every_word() -> None:
    words = set(KEYWORD_CLASSES[:10]) | set(DISTRACTOR_WORDS)
    langs = {lang for _, _, lang in keywords._FESTIVAL.values()} - {"en"}
    assert langs <= set(keywords._RESPELLINGS)
    for lang in langs:
        table = keywords._RESPELLINGS[lang]
        assert set(table) == words, lang
        assert all(t.isascii() and t.isalpha() for t in table.values()), lang
        assert len({table[w] for w in KEYWORD_CLASSES[:10]}) == 10, lang  # the keywords stay distinct


@needs_festival
def test_keywords_festival_refuses_a_missing_voice(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """festival quietly speaks with its default voice when asked for a missing one: the dataset checks first."""
    import uniperception.datasets.keywords as kw

    monkeypatch.setattr(kw, "_festival_voices", lambda: frozenset({"kal_diphone"}))
    with pytest.raises(MissingDependencyError, match="festvox-kdlpc16k"):
        KeywordSpeech(split="train", synth="festival", num_per_class=1, progress=False)
    assert not any((cache / "datasets" / "keywords").glob("festival-*"))


def test_keywords_missing_tools_and_bad_arguments(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(cache))  # no espeak-ng / sox / flite on PATH
    with pytest.raises(MissingDependencyError, match="apt-get install espeak-ng sox flite"):
        KeywordSpeech(split="train", num_per_class=1, progress=False)
    with pytest.raises(InvalidInputError, match="split"):
        KeywordSpeech(split="training")
    with pytest.raises(InvalidInputError, match="num_per_class"):
        KeywordSpeech(num_per_class=0)
    with pytest.raises(InvalidInputError, match="synth"):
        KeywordSpeech(synth="mbrola")
    with pytest.raises(MissingDependencyError, match="festival"):
        KeywordSpeech(synth="festival", num_per_class=1, progress=False)
    assert not (cache / "datasets" / "keywords").exists() or not any(
        (cache / "datasets" / "keywords").iterdir()
    )


@pytest.mark.slow
@needs_espeak
def test_default_datasets_are_byte_identical_across_processes(tmp_path: Path) -> None:
    """Default-size keywords (val) and sprites (train), generated in two fresh processes, match byte for byte."""
    import subprocess
    import sys

    code = (
        "from uniperception.datasets import KeywordSpeech, MovingSprites\n"
        "print(KeywordSpeech(split='val', progress=False).path)\n"
        "print(MovingSprites(split='train', progress=False).path)\n"
    )
    paths = []
    for name in ("one", "two"):
        env = {**os.environ, "UNIPERCEPTION_CACHE": str(tmp_path / name)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        paths.append([Path(p) for p in out.stdout.split()])
    (kw1, sp1), (kw2, sp2) = paths
    assert kw1.name == kw2.name and sp1.name == sp2.name
    assert len(_digest(kw1, "*.wav")) == 240 and _digest(kw1, "*.wav") == _digest(kw2, "*.wav")
    assert len(_digest(sp1, "*.mp4")) == 400 and _digest(sp1, "*.mp4") == _digest(sp2, "*.mp4")


# --------------------------------------------------------------------------------------------- speech commands


def _fake_speech_commands(root: Path) -> dict[str, list[str]]:
    words = ["yes", "no", "up", "cat", "wow"]
    files: list[str] = []
    rng = np.random.default_rng(0)
    for w in words:
        (root / w).mkdir(parents=True)
        for spk in ("0a1b2c3d", "11111111", "22222222", "deadbeef"):
            for n in range(2):
                rel = f"{w}/{spk}_nohash_{n}.wav"
                sf.write(
                    root / rel, (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000, subtype="PCM_16"
                )
                files.append(rel)
    (root / "_background_noise_").mkdir()
    sf.write(root / "_background_noise_" / "white_noise.wav", np.zeros(32000, np.float32), 16000)
    val = [f for f in files if "11111111" in f]
    test = [f for f in files if "22222222" in f]
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    return {"all": files, "val": val, "test": test}


def test_speech_commands_split_lists(tmp_path: Path) -> None:
    lists = _fake_speech_commands(tmp_path)
    splits = {s: SpeechCommands(tmp_path, split=s) for s in ("train", "val", "test")}
    names = {s: {rel for rel, _, _ in ds.samples} for s, ds in splits.items()}
    assert names["val"] == set(lists["val"]) and names["test"] == set(lists["test"])
    assert names["train"] == set(lists["all"]) - set(lists["val"]) - set(lists["test"])
    assert len(names["train"]) == 5 * 2 * 2
    assert not any("_background_noise_" in n for s in names.values() for n in s)
    assert splits["train"].classes == ("cat", "no", "up", "wow", "yes")
    assert {spk for _, _, spk in splits["train"].samples} == {"0a1b2c3d", "deadbeef"}
    wav, sr, label = splits["val"][0]
    assert wav.shape == (1, 16000) and wav.dtype == torch.float32 and sr == 16000
    assert splits["val"].classes[label] == splits["val"].samples[0][0].split("/")[0]
    sub = SpeechCommands(tmp_path, split="train", labels=["yes", "no"])
    assert sub.classes == ("yes", "no", "_unknown_")
    counts = np.bincount(sub.targets, minlength=3)
    assert counts.tolist() == [4, 4, 12]
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(InvalidInputError, match=r"testing_list\.txt"):
        SpeechCommands(tmp_path)


# ------------------------------------------------------------------------------------------------------ shapes


def test_shapes_labels_shapes_and_determinism() -> None:
    assert SHAPE_CLASSES == tuple(
        "box sphere cylinder cone torus tetrahedron octahedron icosahedron arrow moebius".split()
    )
    ds = Shapes(split="train", num_per_class=2, num_points=512, seed=1)
    assert ds.classes == SHAPE_CLASSES and len(ds) == 20
    labels = []
    for i in range(len(ds)):
        pts, y = ds[i]
        labels.append(y)
        assert pts.shape == (512, 3) and pts.dtype == torch.float32
        assert torch.isfinite(pts).all() and float(pts.norm(dim=1).max()) < 1.1
    assert sorted(labels) == sorted(list(range(10)) * 2)
    again = Shapes(split="train", num_per_class=2, num_points=512, seed=1)
    assert torch.equal(ds[13][0], again[13][0])  # per-index determinism, in any order
    assert not torch.equal(ds[13][0], Shapes(split="train", num_per_class=2, num_points=512, seed=2)[13][0])
    assert not torch.equal(ds[3][0], Shapes(split="test", num_per_class=2, num_points=512, seed=1)[3][0])
    # the geometry survives: an unstretched, noiseless sphere (a faceted mesh) has all points near radius 1
    sphere = sample_shape("sphere", 2048, 0, scale_range=(1, 1), noise_std=0, max_dropout=0)
    r = np.linalg.norm(sphere, axis=1)
    assert r.std() < 0.02 and abs(r.mean() - 1) < 0.03
    poisson = Shapes(split="val", num_per_class=1, num_points=256, sampling="poisson")
    assert poisson[4][0].shape == (256, 3)
    with pytest.raises(InvalidInputError):
        Shapes(sampling="grid")
    with pytest.raises(InvalidInputError):
        sample_shape("pyramid")


# ---------------------------------------------------------------------------------------------------- modelnet


@pytest.fixture(scope="session")
def cgal_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CGAL's example meshes from Debian's libcgal-demo (downloaded once, kept in the pytest cache)."""
    from uniperception.datasets.debian import cgal_meshes

    try:
        dest = request.config.cache.mkdir("uniperception-debian") if request.config.cache else None
    except (AttributeError, OSError):
        dest = None
    try:
        return cgal_meshes(dest or tmp_path_factory.mktemp("debian"))
    except MissingDependencyError as e:
        pytest.skip(f"libcgal-demo meshes unavailable: {e}")


MODELNET_TREE = {
    "animal": {"train": ["elephant", "cow", "pig"], "test": ["triceratops"]},
    "machine": {"train": ["rotor", "pinion_small", "anchor"], "test": ["spool", "joint"]},
    "solid": {"train": ["cube", "octahedron", "icosahedron"], "test": ["tetrahedron"]},
}


def test_modelnet_loader_on_real_meshes(cgal_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "modelnet"
    for cls, splits in MODELNET_TREE.items():
        for split, names in splits.items():
            (root / cls / split).mkdir(parents=True)
            for n in names:
                shutil.copy(cgal_dir / f"{n}.off", root / cls / split / f"{n}.off")
    train = ModelNet(root, split="train", num_points=256, seed=0)
    test = ModelNet(root, split="test", num_points=256, seed=0)
    assert train.classes == ("animal", "machine", "solid") and set(train.layout.values()) == {"split-folders"}
    assert len(train) == 9 and len(test) == 4 and train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(len(train)):
        pts, y = train[i]
        assert y == train.targets[i]
        assert pts.shape == (256, 3) and pts.dtype == torch.float32 and torch.isfinite(pts).all()
        assert abs(float(pts.norm(dim=1).max()) - 1) < 1e-5  # normalised into the unit sphere
        assert float(pts.mean(0).abs().max()) < 1e-4
    assert torch.equal(train[2][0], ModelNet(root, num_points=256, seed=0)[2][0])
    assert not torch.equal(train[2][0], ModelNet(root, num_points=256, seed=1)[2][0])
    # points lie on the mesh: every sampled cube point touches a face of the normalised cube
    cube = load_mesh_points(cgal_dir / "cube.off", 500, 0, normalize=False)
    assert np.isclose(np.abs(cube).max(axis=1), np.abs(cube).max()).all()

    # flat layout: root/<class>/*.off with a deterministic split
    flat = tmp_path / "flat"
    for cls, splits in MODELNET_TREE.items():
        (flat / cls).mkdir(parents=True)
        for names in splits.values():
            for n in names:
                shutil.copy(cgal_dir / f"{n}.off", flat / cls / f"{n}.off")
    ftrain, ftest = ModelNet(flat, "train", num_points=64), ModelNet(flat, "test", num_points=64)
    assert set(ftrain.layout.values()) == {"flat"}
    tr, te = {p.name for p, _ in ftrain.samples}, {p.name for p, _ in ftest.samples}
    assert not tr & te and len(tr | te) == 13 and len(te) == 3  # ceil(0.2 * n) per class
    assert [p.name for p, _ in ModelNet(flat, "test", num_points=64).samples] == [
        p.name for p, _ in ftest.samples
    ]


def test_mesh_errors_and_modelnet_header_quirk(tmp_path: Path) -> None:
    root = tmp_path / "mn"
    (root / "thing" / "train").mkdir(parents=True)
    good = root / "thing" / "train" / "glued.off"
    # ModelNet's known defect: counts glued to the keyword on the first line; plus a quad face
    good.write_text("OFF4 1 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n")
    ds = ModelNet(root, num_points=32)
    pts, _ = ds[0]
    assert pts.shape == (32, 3) and float(pts[:, 2].abs().max()) < 1e-6  # a flat square
    bad = {
        "empty.off": "",
        "truncated.off": "OFF\n4 2 0\n0 0 0\n1 0 0\n",
        "garbage.off": "this is not a mesh\n",
        "points.off": "OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n",
        "badindex.off": "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n",
        "nan.off": "OFF\n3 1 0\n0 0 nan\n1 0 0\n0 1 0\n3 0 1 2\n",
        "flat.off": "OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidInputError):
            load_mesh_points(tmp_path / name, 16, 0)
    with pytest.raises(UnsupportedFormatError):
        load_mesh_points(tmp_path / "mesh.fbx", 16)
    with pytest.raises(InvalidInputError, match="no class folders"):
        ModelNet(tmp_path / "mn" / "thing" / "train")
    with pytest.raises(InvalidInputError, match="split"):
        ModelNet(root, split="val")


# ----------------------------------------------------------------------------------------------------- sprites

_DIR_VEC = {
    "up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}  # fmt: skip


def _motion(frames: np.ndarray) -> np.ndarray:
    """Velocity (px/frame) of what moves: centroid of pixels far from the temporal median, fitted over time."""
    f = frames.astype(np.float64)
    diff = np.abs(f - np.median(f, axis=0)).sum(-1)
    yy, xx = np.mgrid[: f.shape[1], : f.shape[2]]
    cents = []
    for d in diff:
        w = d * (d > 60)
        cents.append(((w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()))
    return np.polyfit(np.arange(len(cents)), np.array(cents), 1)[0]


def test_sprites_move_in_the_labelled_direction(cache: Path) -> None:
    ds = MovingSprites(split="train", num_per_class=2, seed=0, progress=False)
    assert ds.classes == DIRECTIONS and len(ds) == 16
    assert ds.path.parent == cache / "datasets" / "sprites"
    for i in range(len(ds)):
        frames, label = ds[i]
        assert frames.shape == (16, 64, 64, 3) and frames.dtype == torch.uint8
        v = _motion(frames.numpy())
        want = np.array(_DIR_VEC[DIRECTIONS[label]], dtype=float)
        cos = v @ want / (np.linalg.norm(v) * np.linalg.norm(want))
        assert cos > 0.95, (DIRECTIONS[label], v)
        assert 1.0 < np.linalg.norm(v) < 3.5  # 1.5-3 px/frame
    # the files are real MP4/H.264 that PyAV decodes
    mp4s = sorted(ds.path.rglob("*.mp4"))
    assert len(mp4s) == 16
    with av.open(str(mp4s[0])) as c:
        assert c.format.name.startswith("mov") and c.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in c.decode(video=0)) == 16


def test_sprites_are_deterministic(tmp_path: Path) -> None:
    a = MovingSprites(tmp_path / "a", split="val", num_per_class=1, seed=5, progress=False)
    b = MovingSprites(tmp_path / "b", split="val", num_per_class=1, seed=5, progress=False)
    c = MovingSprites(tmp_path / "c", split="val", num_per_class=1, seed=6, progress=False)
    assert _digest(a.path, "*.mp4") == _digest(b.path, "*.mp4")
    assert _digest(a.path, "*.mp4") != _digest(c.path, "*.mp4")
    with pytest.raises(InvalidInputError):
        MovingSprites(tmp_path, size=63)


def test_sprites_can_hold_out_shapes(tmp_path: Path) -> None:
    seen = MovingSprites(tmp_path, split="test", num_per_class=2, seed=0, sprite_shapes=("cross", "ring"),
                         progress=False)  # fmt: skip
    assert {row["shape"] for row in seen.samples} <= {"cross", "ring"}
    default = MovingSprites(tmp_path, split="test", num_per_class=2, seed=0, progress=False)
    assert default.path != seen.path  # a different dataset, cached separately
    with pytest.raises(InvalidInputError):
        MovingSprites(tmp_path, split="test", sprite_shapes=("hexagon",))
    with pytest.raises(InvalidInputError):
        MovingSprites(tmp_path, split="test", sprite_shapes=())


def test_interrupted_generation_leaves_no_half_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uniperception.datasets.sprites as sprites_mod

    real_write = sprites_mod.write_mp4
    calls = {"n": 0}

    def flaky_write(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-generation
        real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sprites_mod, "write_mp4", flaky_write)
    with pytest.raises(KeyboardInterrupt):
        MovingSprites(tmp_path, split="test", num_per_class=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the dataset folder nor a temporary folder remains
    ds = MovingSprites(
        tmp_path, split="test", num_per_class=1, progress=False
    )  # the next use generates it whole
    assert len(ds) == 8 and len(list(ds.path.rglob("*.mp4"))) == 8


# ------------------------------------------------------------------------------------------------ video folder


def _write_avi(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_uniform_indices() -> None:
    assert uniform_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert uniform_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # short clips repeat, in order
    assert uniform_indices(1, 3).tolist() == [0, 0, 0]
    idx = uniform_indices(37, 16)
    assert (np.diff(idx) > 0).all() and idx.max() < 37
    with pytest.raises(InvalidInputError):
        uniform_indices(0, 4)


def test_video_folder(tmp_path: Path) -> None:
    def clip(n: int, h: int = 32, w: int = 48) -> np.ndarray:
        # frame t is a flat grey of level 10 * t: the decoded level tells which frame was picked
        return np.stack([np.full((h, w, 3), 10 * t, np.uint8) for t in range(n)])

    (tmp_path / "walk").mkdir()
    (tmp_path / "run").mkdir()
    write_mp4(tmp_path / "walk" / "a.mp4", clip(20))
    _write_avi(tmp_path / "run" / "b.avi", clip(20))
    write_mp4(tmp_path / "run" / "short.mp4", clip(4))
    (tmp_path / "run" / "notes.txt").write_text("ignored")
    ds = VideoFolder(tmp_path, num_frames=8)
    assert ds.classes == ("run", "walk") and len(ds) == 3 and ds.targets == [0, 0, 1]
    for i in range(3):
        frames, _ = ds[i]
        assert frames.shape == (8, 32, 48, 3) and frames.dtype == torch.uint8
    levels = ds[2][0].float().mean(dim=(1, 2, 3)).numpy() / 10  # 20 frames -> 8 spread uniformly
    assert np.allclose(levels, uniform_indices(20, 8), atol=0.6)
    short_levels = ds[1][0].float().mean(dim=(1, 2, 3)).numpy() / 10  # 4 frames -> 8, repeated
    assert np.allclose(short_levels, [0, 0, 1, 1, 2, 2, 3, 3], atol=0.6)
    assert read_video_frames(tmp_path / "run" / "b.avi").shape == (20, 32, 48, 3)
    assert VideoFolder(tmp_path, num_frames=2, size=(16, 24))[0][0].shape == (2, 16, 24, 3)
    broken = tmp_path / "walk" / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(64))
    with pytest.raises(UnsupportedFormatError, match=r"broken\.mp4"):
        VideoFolder(tmp_path, num_frames=4)[len(ds)]
    with pytest.raises(InvalidInputError):
        read_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(InvalidInputError, match="no class folders"):
        VideoFolder(tmp_path / "walk")


# ------------------------------------------------------------------------------------------------- time series


def _ett_frame(n: int = 48) -> pd.DataFrame:
    dates = pd.date_range("2016-07-01", periods=n, freq="h")
    rng = np.random.default_rng(0)
    cols = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    df = pd.DataFrame(rng.normal(size=(n, len(cols))).round(3), columns=cols)
    df.insert(0, "date", dates.strftime("%Y-%m-%d %H:%M:%S"))
    return df


def test_ett_csv_loader(tmp_path: Path) -> None:
    path = tmp_path / "ETTh1.csv"
    raw = _ett_frame()
    raw.to_csv(path, index=False)
    df = load_ett_csv(path)
    assert df.shape == (48, 7) and list(df.columns) == list(raw.columns[1:])
    assert (
        isinstance(df.index, pd.DatetimeIndex)
        and df.index.name == "date"
        and df.index.is_monotonic_increasing
    )
    assert df.index[1] - df.index[0] == pd.Timedelta(hours=1)
    assert np.allclose(df.to_numpy(), raw.iloc[:, 1:].to_numpy())
    assert list(load_ett_csv(path, columns=["OT", "HUFL"]).columns) == ["OT", "HUFL"]

    def write(df: pd.DataFrame, name: str) -> Path:
        p = tmp_path / name
        df.to_csv(p, index=False)
        return p

    shuffled = raw.iloc[[0, 2, 1, *range(3, 48)]]
    with pytest.raises(InvalidInputError, match="not sorted"):
        load_ett_csv(write(shuffled, "unsorted.csv"))
    dup = pd.concat([raw.iloc[:5], raw.iloc[4:]])
    with pytest.raises(InvalidInputError, match="duplicate"):
        load_ett_csv(write(dup, "dup.csv"))
    with pytest.raises(InvalidInputError, match="'date'"):
        load_ett_csv(write(raw.rename(columns={"date": "time"}), "nodate.csv"))
    assert len(load_ett_csv(tmp_path / "nodate.csv", date_column="time")) == 48
    bad_date = raw.copy()
    bad_date.loc[3, "date"] = "not a date"
    with pytest.raises(InvalidInputError, match="dates"):
        load_ett_csv(write(bad_date, "baddate.csv"))
    text = raw.copy().astype({"OT": object})
    text.loc[5, "OT"] = "n/a?"
    with pytest.raises(InvalidInputError, match="non-numeric"):
        load_ett_csv(write(text, "text.csv"))
    holes = raw.copy()
    holes.loc[[10, 11], "OT"] = np.nan
    hp = write(holes, "holes.csv")
    with pytest.raises(InvalidInputError, match="missing values"):
        load_ett_csv(hp)
    assert load_ett_csv(hp, nan_policy="keep")["OT"].isna().sum() == 2
    assert len(load_ett_csv(hp, nan_policy="drop")) == 46
    filled = load_ett_csv(hp, nan_policy="interpolate")["OT"]
    assert not filled.isna().any()
    assert np.isclose(filled.iloc[10], raw.OT[9] + (raw.OT[12] - raw.OT[9]) / 3)
    with pytest.raises(InvalidInputError):
        load_ett_csv(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    ("n", "lookback", "horizon", "stride"), [(48, 24, 12, 1), (48, 24, 12, 5), (36, 24, 12, 1)]
)
def test_window_dataset_counts_and_contents(n: int, lookback: int, horizon: int, stride: int) -> None:
    data = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    ds = WindowDataset(pd.DataFrame(data, columns=["a", "b"]), lookback, horizon, stride)
    assert len(ds) == (n - lookback - horizon) // stride + 1
    for i in range(len(ds)):
        past, future = ds[i]
        assert past.shape == (lookback, 2) and future.shape == (horizon, 2) and past.dtype == torch.float32
        start = i * stride
        assert torch.equal(past, torch.from_numpy(data[start : start + lookback]).float())
        assert torch.equal(
            future, torch.from_numpy(data[start + lookback : start + lookback + horizon]).float()
        )
    last_future = ds[len(ds) - 1][1]
    assert float(last_future[-1, 0]) <= data[-1, 0]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_window_dataset_errors() -> None:
    with pytest.raises(InvalidInputError, match="shorter than lookback"):
        WindowDataset(np.zeros((35, 3)), lookback=24, horizon=12)
    with pytest.raises(InvalidInputError, match="NaN"):
        WindowDataset(np.array([1.0, np.nan, 3.0, 4.0]), lookback=2, horizon=1)
    with pytest.raises(InvalidInputError):
        WindowDataset(np.zeros((10, 2)), lookback=0, horizon=1)
    assert len(WindowDataset(np.zeros(10), 3, 2)) == 6  # a 1-D series is one variable
    pair = WindowDataset(np.zeros((10, 1)), 3, 2, transform=lambda pf: (pf[0] + 1, pf[1]))[0]
    assert float(pair[0].sum()) == 3.0


def test_bundled_forecasting_series() -> None:
    pytest.importorskip("sktime", reason="sktime (the optional 'data' extra) not installed")
    air = load_series("airline")
    assert air.shape == (144, 1) and air.index[0] == pd.Timestamp("1949-01-01")
    assert isinstance(air.index, pd.DatetimeIndex) and air.index.is_monotonic_increasing
    us = load_series("uschange")
    assert list(us.columns) == ["Consumption", "Income", "Production", "Savings", "Unemployment"]
    assert us.index[-1] == pd.Timestamp("2016-07-01")
    solar = load_series("solar")
    assert solar.index.tz is None and len(solar) > 100
    for name in ("lynx", "longley", "shampoo_sales"):
        df = load_series(name)
        assert isinstance(df.index, pd.DatetimeIndex) and not df.isna().any().any()
    assert len(WindowDataset(air, lookback=24, horizon=12, stride=12)) == 10
    with pytest.raises(InvalidInputError):
        load_series("bitcoin")


def test_statsmodels_series() -> None:
    pytest.importorskip("statsmodels", reason="statsmodels not installed")
    co2 = load_series("co2")
    assert co2.shape == (2284, 1) and co2["co2"].isna().sum() > 0
    assert not load_series("co2", nan_policy="interpolate").isna().any().any()
    macro = load_series("macrodata")
    assert macro.index[0] == pd.Timestamp("1959-01-01") and macro.index[1] == pd.Timestamp("1959-04-01")
    assert "realgdp" in macro.columns and "year" not in macro.columns
    assert load_series("nile").shape == (100, 1) and load_series("sunspots").index[0].year == 1700


def test_bundled_classification_sets() -> None:
    pytest.importorskip("sktime", reason="sktime (the optional 'data' extra) not installed")
    gp = load_classification("GunPoint")
    assert gp.X.shape == (200, 1, 150) and gp.X.dtype == np.float32 and gp.classes == ("1", "2")
    assert gp.y.dtype == np.int64 and set(gp.y.tolist()) == {0, 1}
    train, test = load_classification("GunPoint", "train"), load_classification("GunPoint", "test")
    assert len(train.y) == 50 and len(test.y) == 150
    bm = load_classification("BasicMotions", "train")
    assert bm.X.shape[1] == 6 and bm.classes == ("badminton", "running", "standing", "walking")
    jv = load_classification("JapaneseVowels", "test")
    assert isinstance(jv.X, list) and len(jv.X) == len(jv.y)
    assert all(x.shape[0] == 12 for x in jv.X) and len({x.shape[1] for x in jv.X}) > 1
    with pytest.raises(InvalidInputError):
        load_classification("MNIST")


def test_partial_view_keeps_the_side_facing_the_camera() -> None:
    from uniperception.datasets.shapes import partial_view, sample_shape

    pts = sample_shape("sphere", 2048, 0, rotate=False, noise_std=0.0, max_dropout=0.0)
    seen = partial_view(pts, 3)
    assert 0.1 * len(pts) < len(seen) < 0.6 * len(pts) and seen.dtype == np.float32
    centre = seen.mean(0)  # all on one side: the centroid moves away from the sphere's centre
    assert np.linalg.norm(centre) > 0.3
    assert np.array_equal(partial_view(pts, 3), seen)  # deterministic for a seed
    with pytest.raises(InvalidInputError):
        partial_view(np.zeros((3, 2)))


def test_shapes_point_count_range_and_partial_views() -> None:
    ds = Shapes(split="train", num_per_class=3, num_points_range=(256, 2048), partial_prob=0.5)
    sizes = [len(ds[i][0]) for i in range(len(ds))]
    assert min(sizes) >= 100 and max(sizes) <= 2048 and len(set(sizes)) > 5
    assert [len(ds[i][0]) for i in range(len(ds))] == sizes  # deterministic per index
    full = Shapes(split="train", num_per_class=3, num_points_range=(512, 512))
    assert {len(full[i][0]) for i in range(len(full))} == {512}
    with pytest.raises(InvalidInputError):
        Shapes(num_points_range=(2, 10))
    with pytest.raises(InvalidInputError):
        Shapes(partial_prob=1.5)


def test_shapes_cache_returns_the_same_clouds_and_is_not_corrupted_by_callers() -> None:
    kwargs = dict(split="train", num_per_class=2, num_points_range=(256, 1024), partial_prob=0.5)
    plain, cached = Shapes(**kwargs), Shapes(**kwargs, cache=True)
    for i in range(len(plain)):
        first = cached[i][0]
        assert torch.equal(first, plain[i][0])
        first.mul_(0)  # a caller modifying its sample must not change the cached cloud
        assert torch.equal(cached[i][0], plain[i][0])
    assert len(cached._cache) == len(plain)
