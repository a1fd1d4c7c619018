"""Checkpoint loading, conversion and writing: ``uniperception.checkpoints`` and ``create_model(pretrained=...)``.

Numerical ground truth is the official reference data in ``../shared/reference/vectors`` (UniRepLKNet-A with
randomised weights and BatchNorm statistics, in training and deploy form, plus the official logits). Tests
that need it skip with a clear reason when it is absent; everything else runs on a tiny custom model at odd
spatial sizes so the file stays fast.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from uniperception import create_model
from uniperception.backbones.unireplknet import PRETRAINED_CFGS, UniRepLKNet
from uniperception.checkpoints import load_official, read_checkpoint, save_state_dict
from uniperception.errors import CheckpointError

ATOL = 1e-4
OFFICIAL_A_FILE = PRETRAINED_CFGS["a"][0].filename  # unireplknet_a_in1k_224_acc77.03.pth
HUB_REPO_DIR = "models--DingXiaoH--UniRepLKNet"
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"
A_DIMS = (40, 80, 160, 320)
#: UniRepLKNet-A blocks whose dwconv is a Dilated Reparam Block (k = 13): stages 1-3
A_LARGE_KERNEL_BLOCKS = [f"stages.1.{b}" for b in range(2)] + [f"stages.2.{b}" for b in range(6)] + [
    f"stages.3.{b}" for b in range(2)
]
TRAIN_FILE = "unireplknet_a_random.safetensors"
DEPLOY_FILE = "unireplknet_a_random_deploy.safetensors"
IO_FILE = "unireplknet_a_io.safetensors"


# ------------------------------------------------------------------------------------------------ helpers
def _reference_dir() -> Path:
    env = os.environ.get("UNIPERCEPTION_REFERENCE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference"


def _small_model(**kwargs) -> UniRepLKNet:
    """A tiny UniRepLKNet with one block of each kind: k=3 (plain conv), 13 and 7 (dilated reparam), 0."""
    kwargs.setdefault("num_classes", 10)
    return UniRepLKNet(
        depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_sizes=((3,), (13,), (7,), (0,)), **kwargs
    )


def _randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every float entry randomised (positive running variances)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            r = torch.randn(v.shape, generator=g) * 0.3
            out[k] = r.abs() + 0.5 if k.endswith("running_var") else r
        else:
            out[k] = v.clone()
    return out


def _run(model: torch.nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _assert_state_equal(model: torch.nn.Module, sd: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    msd = model.state_dict()
    for k, v in sd.items():
        if k.startswith(skip):
            continue
        assert k in msd, k
        assert torch.equal(msd[k], v), f"{k} was not loaded"


def _params_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Speed only: on a small, shared CPU box, intra-op threads oversubscribe (seen: 50x slower forwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fast_trunc_normal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Speed only: torch's trunc_normal_ (rejection loop) dominates building UniRepLKNet-A on CPU.

    Every test here overwrites the initial weights with a checkpoint, so how they are drawn does not matter;
    a clamped normal keeps the same scale.
    """

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        with torch.no_grad():
            return tensor.normal_(mean, std, generator=generator).clamp_(a, b)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", trunc_normal_)


@pytest.fixture(scope="module")
def vectors_dir() -> Path:
    d = _reference_dir() / "vectors"
    missing = [f for f in (TRAIN_FILE, DEPLOY_FILE, IO_FILE) if not (d / f).is_file()]
    if missing:
        pytest.skip(
            f"reference vectors {missing} not found in {d}; set UNIPERCEPTION_REFERENCE to the shared/reference dir"
        )
    return d


@pytest.fixture(scope="module")
def ref_sd(vectors_dir: Path) -> dict[str, torch.Tensor]:
    """Official training-form state dict of UniRepLKNet-A (read-only: tests copy before changing it)."""
    return load_file(str(vectors_dir / TRAIN_FILE))


@pytest.fixture(scope="module")
def ref_deploy_sd(vectors_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(vectors_dir / DEPLOY_FILE))


@pytest.fixture(scope="module")
def ref_io(vectors_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(vectors_dir / IO_FILE))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory, ref_sd) -> Path:
    """The reference weights as the official training script writes them, under the official file name."""
    d = tmp_path_factory.mktemp("official")
    path = d / OFFICIAL_A_FILE
    ckpt = {
        "model": OrderedDict(ref_sd),
        "epoch": 299,
        "args": argparse.Namespace(lr=4e-3, model="unireplknet_a", drop_path=0.0, input_size=224),
    }
    torch.save(ckpt, path)
    return path


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face hub cache (env vars and the constants huggingface_hub read at import)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _populate_hub_cache(cache: Path, source: Path, filename: str) -> Path:
    """The real cache layout: blobs/<etag>, snapshots/<rev>/<filename> → blob (symlink), refs/main."""
    repo = cache / HUB_REPO_DIR
    (repo / "blobs").mkdir(parents=True)
    blob = repo / "blobs" / ("e" * 64)
    blob.write_bytes(source.read_bytes())
    snap = repo / "snapshots" / HUB_REVISION
    snap.mkdir(parents=True)
    target = snap / filename
    try:
        target.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    except OSError:  # no symlinks on this filesystem: the hub falls back to plain copies as well
        target.write_bytes(blob.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    return target


# ================================================================================ 1. wrappers and formats
def test_loads_reference_safetensors_path(vectors_dir: Path, ref_io) -> None:
    for path in (vectors_dir / TRAIN_FILE, str(vectors_dir / TRAIN_FILE)):
        model = create_model("unireplknet_a")
        report = load_official(model, path)
        assert report.ok, report.summary()
        assert not model.is_deploy
        _assert_logits(_run(model, ref_io["input"]), ref_io["logits"])


def _wrap(sd: dict[str, torch.Tensor], kind: str):
    if kind == "bare":
        return OrderedDict(sd)
    if kind == "model_epoch_args":
        return {"model": OrderedDict(sd), "epoch": 3, "args": argparse.Namespace(lr=1.0)}
    if kind == "state_dict_module_prefix":
        return {"state_dict": OrderedDict((f"module.{k}", v) for k, v in sd.items())}
    if kind == "model_ema":
        return {"model_ema": OrderedDict(sd), "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}
    if kind == "mmdet_backbone_prefix":
        g = torch.Generator().manual_seed(5)
        inner = OrderedDict((f"backbone.{k}", v) for k, v in sd.items())
        inner["neck.lateral_convs.0.conv.weight"] = torch.randn(256, 40, 1, 1, generator=g)
        inner["neck.lateral_convs.0.conv.bias"] = torch.randn(256, generator=g)
        inner["neck.fpn_convs.3.conv.weight"] = torch.randn(256, 256, 3, 3, generator=g)
        return {"meta": {"epoch": 36, "mmdet_version": "2.28.2", "CLASSES": ["person", "car"]}, "state_dict": inner}
    raise AssertionError(kind)


WRAPPINGS = ["bare", "model_epoch_args", "state_dict_module_prefix", "model_ema", "mmdet_backbone_prefix"]


@pytest.mark.parametrize("kind", WRAPPINGS)
@pytest.mark.parametrize("via", ["pth_file", "dict"])
def test_loads_wrapped_training_checkpoint(kind: str, via: str, tmp_path: Path, ref_sd, ref_io) -> None:
    obj = _wrap(ref_sd, kind)
    if via == "pth_file":
        src = tmp_path / "ckpt.pth"
        torch.save(obj, src)
    else:
        src = obj
    model = create_model("unireplknet_a")
    report = load_official(model, src)
    assert report.ok, report.summary()
    assert not report.skipped
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits"])


def test_safetensors_content_is_sniffed_whatever_the_suffix(tmp_path: Path, vectors_dir: Path, ref_sd) -> None:
    # hub files are often renamed; the content, not the suffix, decides how the file is read
    path = tmp_path / "weights.pth"
    path.write_bytes((vectors_dir / TRAIN_FILE).read_bytes())
    model = create_model("unireplknet_a")
    assert load_official(model, path).ok
    _assert_state_equal(model, ref_sd)


def test_loads_module_state_dict_with_metadata_attribute(tmp_path: Path) -> None:
    # what `torch.save(model.state_dict())` writes: an OrderedDict carrying a `_metadata` attribute
    src = _small_model()
    src.load_state_dict(_randomised(src, 1))
    path = tmp_path / "sd.pth"
    torch.save(src.state_dict(), path)
    dst = _small_model()
    assert load_official(dst, path).ok
    x = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_run(dst, x), _run(src, x), atol=0, rtol=0)


def test_load_does_not_mutate_callers_dict(ref_sd) -> None:
    wrapped = {"state_dict": {f"module.{k}": v for k, v in ref_sd.items()}}
    inner_keys = list(wrapped["state_dict"])
    snapshot = {k: v.clone() for k, v in ref_sd.items()}
    load_official(create_model("unireplknet_a", deploy=True), wrapped)  # converts through a twin model
    assert list(wrapped) == ["state_dict"]
    assert list(wrapped["state_dict"]) == inner_keys
    for k, v in snapshot.items():
        assert torch.equal(ref_sd[k], v), k


@pytest.mark.parametrize(
    "obj",
    [{}, {"a": 1, "b": "x"}, [torch.zeros(3)], torch.zeros(3), {"model": {"epoch": 3}}],
    ids=["empty", "no_tensors", "list", "tensor", "model_without_tensors"],
)
def test_object_without_state_dict_is_rejected(obj, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_official(_small_model(), obj)
    path = tmp_path / "obj.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError):
        load_official(_small_model(), path)


# ================================================================================ 2. training / deploy form
def test_deploy_checkpoint_reparameterises_training_model(ref_deploy_sd, ref_io) -> None:
    model = create_model("unireplknet_a")
    assert not model.is_deploy
    report = load_official(model, ref_deploy_sd)
    assert report.ok, report.summary()
    assert model.is_deploy
    assert any("deploy" in c and "re-param" in c for c in report.converted), report.converted
    assert set(model.state_dict()) == set(ref_deploy_sd)
    _assert_state_equal(model, ref_deploy_sd)
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits_reparam"])


def test_training_checkpoint_into_deploy_model(ref_sd, ref_io) -> None:
    model = create_model("unireplknet_a", deploy=True)
    report = load_official(model, ref_sd)
    assert report.ok, report.summary()
    assert model.is_deploy
    assert any("training" in c and "re-param" in c for c in report.converted), report.converted
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits_reparam"])


def test_deploy_checkpoint_into_deploy_model_needs_no_conversion(ref_deploy_sd, ref_io) -> None:
    model = create_model("unireplknet_a", deploy=True)
    report = load_official(model, ref_deploy_sd)
    assert report.ok and not report.converted, report.summary()
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits_reparam"])


def test_training_checkpoint_into_training_model_needs_no_conversion(ref_sd) -> None:
    model = create_model("unireplknet_a")
    report = load_official(model, ref_sd)
    assert report.ok and not report.converted and not report.skipped, report.summary()
    assert not model.is_deploy
    _assert_state_equal(model, ref_sd)


# ================================================================================ 3. older deploy layout
def _old_deploy_layout(deploy_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pre-2023-12-01 deploy layout: large-kernel convs at dwconv.weight/bias (no lk_origin)."""
    out = dict(deploy_sd)
    for block in A_LARGE_KERNEL_BLOCKS:
        for p in ("weight", "bias"):
            out[f"{block}.dwconv.{p}"] = out.pop(f"{block}.dwconv.lk_origin.{p}")
    assert not any("lk_origin" in k for k in out)
    return out


def test_old_deploy_layout_into_deploy_model(ref_deploy_sd, ref_io) -> None:
    model = create_model("unireplknet_a", deploy=True)
    report = load_official(model, _old_deploy_layout(ref_deploy_sd))
    assert report.ok, report.summary()
    assert any("stages.2.3.dwconv.weight" in c for c in report.converted), report.converted
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits_reparam"])


def test_old_deploy_layout_into_training_model(ref_deploy_sd, ref_io) -> None:
    model = create_model("unireplknet_a")
    report = load_official(model, _old_deploy_layout(ref_deploy_sd))
    assert report.ok, report.summary()
    assert model.is_deploy
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits_reparam"])


# ================================================================================ 4. small-kernel conv bias
@pytest.mark.parametrize("deploy", [False, True], ids=["training_model", "deploy_model"])
def test_small_kernel_conv_bias_is_folded_into_bn(deploy: bool, ref_sd, ref_io) -> None:
    # conv bias β then BN(running_mean m) == BN(running_mean m − β); so adding β to both keeps the function
    block = "stages.0.1"  # k = 3 in UniRepLKNet-A
    assert f"{block}.dwconv.weight" in ref_sd and f"{block}.dwconv.bias" not in ref_sd
    beta = torch.randn(A_DIMS[0], generator=torch.Generator().manual_seed(7)) * 2.0
    sd = dict(ref_sd)
    sd[f"{block}.dwconv.bias"] = beta
    sd[f"{block}.norm.running_mean"] = ref_sd[f"{block}.norm.running_mean"] + beta
    model = create_model("unireplknet_a", deploy=deploy)
    report = load_official(model, sd)
    assert report.ok, report.summary()
    assert any(f"{block}.dwconv.bias" in c for c in report.converted), report.converted
    expected = ref_io["logits_reparam"] if deploy else ref_io["logits"]
    _assert_logits(_run(model, ref_io["input"]), expected)
    if not deploy:  # the fold gives back the original statistics
        torch.testing.assert_close(model.stages[0][1].norm.running_mean, ref_sd[f"{block}.norm.running_mean"])


# ================================================================================ 5. strict errors
MISSING_KEY = "stages.0.0.se.down.weight"
UNEXPECTED_KEY = "stages.1.0.dwconv.dil_conv_k9_4.weight"
SHAPE_KEY = "stages.2.0.pwconv1.1.weight"


def _corrupt(sd: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], str]:
    sd = dict(sd)
    if kind == "missing":
        del sd[MISSING_KEY]
        return sd, MISSING_KEY
    if kind == "unexpected":
        sd[UNEXPECTED_KEY] = torch.zeros(16, 1, 9, 9)
        return sd, UNEXPECTED_KEY
    sd[SHAPE_KEY] = torch.zeros(129, 32)
    return sd, SHAPE_KEY


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_strict_mismatch_raises_naming_the_key(kind: str) -> None:
    good = _randomised(_small_model(), 2)
    sd, key = _corrupt(good, kind)
    model = _small_model()
    before = _params_snapshot(model)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_official(model, sd)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a failed strict load changed the model"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_non_strict_reports_instead_of_raising(kind: str) -> None:
    good = _randomised(_small_model(), 3)
    sd, key = _corrupt(good, kind)
    model = _small_model()
    before = _params_snapshot(model)
    report = load_official(model, sd, strict=False)
    assert not report.ok
    listed = {"missing": report.missing, "unexpected": report.unexpected, "shape": report.mismatched}[kind]
    assert any(entry.split(":")[0] == key for entry in listed), (kind, report.summary())
    others = [report.missing, report.unexpected, report.mismatched]
    others.remove(listed)
    assert not any(others), report.summary()
    # everything else is loaded; the offending entry keeps the model's value
    _assert_state_equal(model, {k: v for k, v in good.items() if k != key})
    if kind != "unexpected":
        assert torch.equal(model.state_dict()[key], before[key])


def test_non_strict_training_checkpoint_into_deploy_model() -> None:
    sd = _randomised(_small_model(), 4)
    del sd[MISSING_KEY]
    model = _small_model(deploy=True)
    report = load_official(model, sd, strict=False)
    assert any(MISSING_KEY in m for m in report.missing), report.summary()


def test_failed_deploy_checkpoint_load_leaves_training_model_untouched() -> None:
    deploy_sd = _small_model().reparameterize().state_dict()
    del deploy_sd[MISSING_KEY]
    model = _small_model()
    before = _params_snapshot(model)
    with pytest.raises(CheckpointError, match=MISSING_KEY.replace(".", r"\.")):
        load_official(model, deploy_sd)
    assert not model.is_deploy
    assert set(model.state_dict()) == set(before)


# ================================================================================ 6. classifier head
def _with_22k_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    out = dict(sd)
    out["head.weight"] = torch.randn(21841, A_DIMS[-1], generator=g) * 0.02
    out["head.bias"] = torch.randn(21841, generator=g) * 0.02
    return out


def test_head_size_mismatch_raises_mentioning_adapt_head(ref_sd) -> None:
    with pytest.raises(CheckpointError, match="adapt_head") as info:
        load_official(create_model("unireplknet_a"), _with_22k_head(ref_sd))
    assert "head.weight" in str(info.value)


def test_adapt_head_skips_foreign_head_and_keeps_model_head(ref_sd) -> None:
    model = create_model("unireplknet_a")
    head_before = (model.head.weight.detach().clone(), model.head.bias.detach().clone())
    report = load_official(model, _with_22k_head(ref_sd), adapt_head=True)
    assert report.ok, report.summary()
    assert any(s.startswith("head.weight") for s in report.skipped), report.skipped
    assert any(s.startswith("head.bias") for s in report.skipped), report.skipped
    assert torch.equal(model.head.weight, head_before[0]) and torch.equal(model.head.bias, head_before[1])
    _assert_state_equal(model, ref_sd, skip=("head.",))


def test_adapt_head_with_matching_head_still_loads_it(ref_sd) -> None:
    model = create_model("unireplknet_a")
    report = load_official(model, ref_sd, adapt_head=True)
    assert report.ok and not report.skipped, report.summary()
    _assert_state_equal(model, ref_sd)


def test_create_model_pretrained_dir(official_file: Path, ref_io) -> None:
    model = create_model("unireplknet_a", pretrained=official_file.parent)
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits"])


@pytest.mark.parametrize("num_classes", [10, 0])
def test_create_model_pretrained_dir_other_num_classes(num_classes: int, official_file: Path, ref_sd) -> None:
    model = create_model("unireplknet_a", pretrained=official_file.parent, num_classes=num_classes)
    _assert_state_equal(model, ref_sd, skip=("head.",))
    if num_classes:
        assert tuple(model.head.weight.shape) == (num_classes, A_DIMS[-1])
    else:
        assert isinstance(model.head, torch.nn.Identity)
        assert "head.weight" not in model.state_dict()
    out = _run(model, torch.randn(1, 3, 37, 45, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, num_classes or A_DIMS[-1])


# ================================================================================ 7. safety and corruption
class _TouchPayload:
    """Unpickling this calls ``Path.touch(marker)``: harmless, but proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _write_malicious(path: Path, marker: Path, fmt: str) -> None:
    import pickle

    obj = {"model": {"head.weight": torch.zeros(2, 2), "head.bias": _TouchPayload(marker)}}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
def test_code_executing_pickle_is_refused(fmt: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _write_malicious(path, marker, fmt)
    with pytest.raises(CheckpointError):
        load_official(_small_model(), path)
    assert not marker.exists(), "the checkpoint loader executed code from a pickle"
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()
    if fmt != "raw_pickle":  # the payload is live: an unrestricted load does run it
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Bytes of valid small checkpoints to corrupt."""
    d = tmp_path_factory.mktemp("small")
    sd = {k: v.contiguous() for k, v in _randomised(_small_model(), 8).items()}
    save_file(sd, str(d / "m.safetensors"))
    torch.save(sd, d / "m.pth")
    torch.save(sd, d / "legacy.pth", _use_new_zipfile_serialization=False)
    return {name: (d / name).read_bytes() for name in ("m.safetensors", "m.pth", "legacy.pth")}


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def _header_pos(data: bytes, needle: bytes, offset: int = 0) -> int:
    n = struct.unpack("<Q", data[:8])[0]
    i = data.index(needle, 8, 8 + n)
    return i + offset


CORRUPTIONS = {
    "empty": lambda f: ("x.safetensors", b""),
    "empty_pth": lambda f: ("x.pth", b""),
    "safetensors_truncated_half": lambda f: ("x.safetensors", f["m.safetensors"][: len(f["m.safetensors"]) // 2]),
    "safetensors_truncated_in_header": lambda f: ("x.safetensors", f["m.safetensors"][:100]),
    "safetensors_truncated_length_prefix": lambda f: ("x.safetensors", f["m.safetensors"][:5]),
    "safetensors_flip_length_low": lambda f: ("x.safetensors", _flip(f["m.safetensors"], 0, 0)),
    "safetensors_flip_length_high": lambda f: ("x.safetensors", _flip(f["m.safetensors"], 7, 7)),
    "safetensors_flip_open_brace": lambda f: ("x.safetensors", _flip(f["m.safetensors"], 8, 0)),
    "safetensors_flip_dtype": lambda f: (
        "x.safetensors", _flip(f["m.safetensors"], _header_pos(f["m.safetensors"], b'"F32"', 2), 1)
    ),
    "safetensors_flip_offsets": lambda f: (
        "x.safetensors",
        _flip(f["m.safetensors"], _header_pos(f["m.safetensors"], b'"data_offsets":[', 17), 0),
    ),
    "safetensors_flip_key_name": lambda f: (
        "x.safetensors", _flip(f["m.safetensors"], _header_pos(f["m.safetensors"], b'"stages.', 3), 0)
    ),
    "pth_truncated_half": lambda f: ("x.pth", f["m.pth"][: len(f["m.pth"]) // 2]),
    "pth_truncated_end": lambda f: ("x.pth", f["m.pth"][:-10]),
    "pth_zip_magic_only": lambda f: ("x.pth", b"PK\x03\x04" + bytes(60)),
    "random_bytes_pth": lambda f: ("x.pth", random.Random(0).randbytes(4096)),
    "random_bytes_safetensors": lambda f: ("x.safetensors", random.Random(1).randbytes(4096)),
    "random_bytes_bin": lambda f: ("x.bin", random.Random(2).randbytes(100)),
    "text_file": lambda f: ("x.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_file_raises_checkpoint_error(case: str, small_files, tmp_path: Path) -> None:
    name, data = CORRUPTIONS[case](small_files)
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_official(_small_model(), path)


@pytest.mark.timeout(30)
def test_missing_path_or_directory_raises_checkpoint_error(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.pth", str(tmp_path / "nope.safetensors"), tmp_path):
        with pytest.raises(CheckpointError):
            load_official(_small_model(), path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "data",
    [b"\x80", b"\x80\x02.", b"\x80\x02]s.", b"\x80\x02h\x05."],
    ids=["lone_proto_byte", "stop_on_empty_stack", "setitem_on_short_stack", "unknown_memo"],
)
def test_corrupt_pickle_stream_raises_checkpoint_error(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


@pytest.mark.timeout(30)
def test_truncated_legacy_pth_raises_checkpoint_error(small_files, tmp_path: Path) -> None:
    full = small_files["legacy.pth"]
    path = tmp_path / "x.pth"
    for cut in [*range(1, 128), len(full) // 2, len(full) - 1]:
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_legacy_pth_loads(small_files, tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    path.write_bytes(small_files["legacy.pth"])
    model = _small_model()
    assert load_official(model, path).ok
    _assert_state_equal(model, _randomised(_small_model(), 8))


# ================================================================================ 8. hub cache and resolution
def test_pretrained_true_resolves_offline_hub_cache(hub_cache: Path, official_file: Path, ref_io) -> None:
    _populate_hub_cache(hub_cache, official_file, OFFICIAL_A_FILE)
    model = create_model("unireplknet_a", pretrained=True)
    _assert_logits(_run(model, ref_io["input"]), ref_io["logits"])


def test_pretrained_true_with_tag_resolves_offline_hub_cache(hub_cache: Path, official_file: Path, ref_sd) -> None:
    _populate_hub_cache(hub_cache, official_file, OFFICIAL_A_FILE)
    model = create_model("unireplknet_a.in1k", pretrained=True)
    _assert_state_equal(model, ref_sd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["empty_cache", "other_file_cached"])
def test_pretrained_true_not_cached_says_to_pass_a_path(layout: str, hub_cache: Path, tmp_path: Path) -> None:
    if layout == "other_file_cached":
        other = tmp_path / "other.pth"
        torch.save({"x": torch.zeros(1)}, other)
        _populate_hub_cache(hub_cache, other, "unireplknet_f_in1k_224_acc78.58.pth")
    with pytest.raises(CheckpointError) as info:
        create_model("unireplknet_a", pretrained=True)
    msg = str(info.value)
    assert OFFICIAL_A_FILE in msg
    assert "pretrained=" in msg and "path" in msg, msg


def test_create_model_tag_with_file_path(official_file: Path, ref_sd) -> None:
    for p in (official_file, str(official_file)):
        model = create_model("unireplknet_a.in1k", pretrained=p)
        _assert_state_equal(model, ref_sd)


def test_pretrained_dir_with_several_candidates_is_ambiguous(tmp_path: Path) -> None:
    sd = {"head.weight": torch.zeros(1)}
    torch.save(sd, tmp_path / "a.pth")
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=OFFICIAL_A_FILE.replace(".", r"\.")):
        create_model("unireplknet_a", pretrained=tmp_path)


@pytest.mark.parametrize("where", ["missing_file", "empty_dir"])
def test_pretrained_path_not_found(where: str, tmp_path: Path) -> None:
    target = tmp_path / "nope.pth" if where == "missing_file" else tmp_path
    with pytest.raises(CheckpointError):
        create_model("unireplknet_a", pretrained=target)


# ================================================================================ 9. features_only
def test_features_only_pretrained_dir(official_file: Path, ref_sd) -> None:
    model = create_model("unireplknet_a", features_only=True, pretrained=official_file.parent)
    _assert_state_equal(model, ref_sd, skip=("head.", "norm."))
    msd = model.state_dict()
    assert not any(k.startswith(("head.", "norm.")) for k in msd)
    for i, d in enumerate(A_DIMS):  # official features mode: norm0..3 absent from the file stay at 1/0
        assert torch.equal(msd[f"norm{i}.weight"], torch.ones(d))
        assert torch.equal(msd[f"norm{i}.bias"], torch.zeros(d))
    x = torch.randn(1, 3, 37, 45, generator=torch.Generator().manual_seed(0))
    feats = _run(model, x)
    assert isinstance(feats, list) and len(feats) == 4
    for i, (f, d) in enumerate(zip(feats, A_DIMS, strict=True)):
        s = 2 ** (i + 2)
        assert tuple(f.shape) == (1, d, -(-37 // s), -(-45 // s)), (i, tuple(f.shape))
    # the backbone really carries the reference weights: the last map is LN(final map of the classifier)
    clf = create_model("unireplknet_a")
    load_official(clf, ref_sd)
    clf.eval()
    with torch.no_grad():
        last = clf.forward_features(x)
    expected = F.layer_norm(last.permute(0, 2, 3, 1), (A_DIMS[-1],), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats[3], expected, atol=ATOL, rtol=0)


def test_features_checkpoint_with_random_norms_loads_them(ref_sd) -> None:
    g = torch.Generator().manual_seed(12)
    backbone = {k: v for k, v in ref_sd.items() if not k.startswith(("head.", "norm."))}
    for i, d in enumerate(A_DIMS):
        backbone[f"norm{i}.weight"] = torch.rand(d, generator=g) + 0.5
        backbone[f"norm{i}.bias"] = torch.randn(d, generator=g)
    ckpt = {"meta": {"epoch": 36}, "state_dict": {f"backbone.{k}": v for k, v in backbone.items()}}
    ckpt["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    model = create_model("unireplknet_a", features_only=True)
    report = load_official(model, ckpt)
    assert report.ok, report.summary()
    _assert_state_equal(model, backbone)
    assert set(model.state_dict()) == set(backbone)


def test_features_only_from_deploy_checkpoint(ref_deploy_sd) -> None:
    model = create_model("unireplknet_a", features_only=True)
    report = load_official(model, ref_deploy_sd)
    assert report.ok, report.summary()
    assert model.is_deploy
    _assert_state_equal(model, ref_deploy_sd, skip=("head.", "norm."))
    feats = _run(model, torch.randn(1, 3, 37, 45, generator=torch.Generator().manual_seed(1)))
    assert [tuple(f.shape[2:]) for f in feats] == [(10, 12), (5, 6), (3, 3), (2, 2)]


# ================================================================================ 10. save_state_dict
def _varied_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64_scalar": torch.tensor(12345, dtype=torch.int64),  # like num_batches_tracked
        "u8": torch.arange(10, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "non_contiguous": base.t(),
        "view": base[1:4, ::2],
        "shared_a": base,
        "shared_b": base,  # the same tensor under two keys (tied weights)
        "empty": torch.zeros(0, 3),
        "subnormal_and_special": torch.tensor([1e-40, float("inf"), -float("inf"), -0.0]),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_state_dict_round_trip_is_exact(suffix: str, tmp_path: Path) -> None:
    sd = _varied_state_dict()
    path = save_state_dict(sd, tmp_path / "sub" / f"weights{suffix}")
    assert Path(path).is_file()
    back = read_checkpoint(path)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k
    nan = {"nan": torch.tensor([float("nan"), 1.0])}
    back = read_checkpoint(save_state_dict(nan, tmp_path / f"nan{suffix}"))
    assert torch.equal(back["nan"].isnan(), nan["nan"].isnan())
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [f"weights{suffix}"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_state_dict_model_round_trip(suffix: str, tmp_path: Path) -> None:
    src = _small_model()
    src.load_state_dict(_randomised(src, 14))
    path = save_state_dict(src.state_dict(), tmp_path / f"m{suffix}")
    dst = _small_model()
    assert load_official(dst, path).ok
    _assert_state_equal(dst, src.state_dict())


class _Interrupted(BaseException):
    """Stands in for KeyboardInterrupt / SystemExit without disturbing pytest."""


@pytest.mark.parametrize("exc", [RuntimeError, _Interrupted], ids=["error", "interrupt"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_state_dict_failure_mid_write_keeps_old_file(
    suffix: str, exc: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    target = tmp_path / f"weights{suffix}"
    old = {"w": torch.arange(6.0)}
    save_state_dict(old, target)
    old_bytes = target.read_bytes()
    calls = []

    def failing_writer(obj, dest, *args, **kwargs):
        calls.append(dest)
        with open(dest, "wb") as fh:
            fh.write(b"PARTIAL" * 100)
        raise exc("disk full")

    if suffix == ".safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", failing_writer)
    else:
        monkeypatch.setattr(torch, "save", failing_writer)
    new = {"w": torch.randn(1000), "v": torch.ones(3)}
    with pytest.raises((exc, CheckpointError)):
        save_state_dict(new, target)
    assert calls, "the serialiser was not called (monkeypatch target is stale)"
    assert Path(calls[0]) != target, "save_state_dict wrote straight to the destination"
    assert target.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "a temporary file was left behind"
    monkeypatch.undo()
    back = read_checkpoint(target)
    assert torch.equal(back["w"], old["w"])


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_state_dict_respects_umask(suffix: str, tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = save_state_dict({"w": torch.zeros(2)}, tmp_path / f"w{suffix}")
    finally:
        os.umask(old_umask)
    assert Path(path).stat().st_mode & 0o777 == 0o644


def test_features_checkpoint_into_subset_of_out_indices() -> None:
    """A full features checkpoint (norm0..norm3) loads into a model returning only some stages."""
    full = create_model("unireplknet_a", features_only=True)
    with torch.no_grad():
        for i in range(4):
            getattr(full, f"norm{i}").weight.uniform_(0.5, 1.5)
    sub = create_model("unireplknet_a", features_only=True, out_indices=(1, 3))
    report = load_official(sub, full.state_dict())
    assert any(s.startswith("norm0.weight") for s in report.skipped)
    assert torch.equal(sub.norm3.weight, full.norm3.weight) and not hasattr(sub, "norm0")
