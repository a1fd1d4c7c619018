"""The Perceiver front door (image modality here; other modalities are tested with their adapters)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import uniperception as up
from uniperception import Perceiver, Prediction
from uniperception.errors import CheckpointError, InvalidInputError, ModalityMismatchError
from uniperception.heads import ClassificationHead, ClassificationHeadConfig

SMALL = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_sizes": ((3,), (13,), (7,), (3,))}
LABELS = ["cat", "dog", "bird", "fish", "cow", "owl"]


@pytest.fixture
def perceiver() -> Perceiver:
    torch.manual_seed(0)
    return Perceiver("image", backbone="unireplknet_a", labels=LABELS, adapter={"size": 48}, backbone_kwargs=SMALL)


def _img(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (50, 70, 3), dtype=np.uint8)


def test_classify_single_and_list(perceiver):
    preds = perceiver.classify_image(_img(), top_k=3)
    assert len(preds) == 3 and all(isinstance(p, Prediction) for p in preds)
    assert [p.score for p in preds] == sorted((p.score for p in preds), reverse=True)
    assert {p.label for p in preds} <= set(LABELS) and LABELS[preds[0].index] == preds[0].label
    many = perceiver.classify_image([_img(0), _img(1)], top_k=10)
    assert len(many) == 2 and len(many[0]) == len(LABELS)
    one = perceiver.classify_image(_img(0), top_k=1)[0]  # batch size changes only the float rounding
    assert many[0][0].label == one.label and abs(many[0][0].score - one.score) < 1e-5
    assert abs(sum(p.score for p in many[1]) - 1.0) < 1e-5
    with pytest.raises(InvalidInputError):
        perceiver.classify_image([])


def test_modality_mismatch_names_the_bundle_modality(perceiver):
    with pytest.raises(ModalityMismatchError, match="'image'"):
        perceiver.classify_audio(np.zeros(16000, dtype=np.float32), sample_rate=16000)
    with pytest.raises(TypeError):  # ModalityMismatchError is also a TypeError
        perceiver.classify_points(np.zeros((10, 3)))


def test_bad_images_are_clear_errors(perceiver, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(up.UnsupportedFormatError):
        perceiver.classify_image(bad)
    with pytest.raises(InvalidInputError, match="not found"):
        perceiver.classify_image(tmp_path / "missing.png")
    nan = _img().astype(np.float32) / 255
    nan[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        perceiver.classify_image(nan)
    with pytest.raises(InvalidInputError):
        perceiver.classify_image(np.zeros((2, 3, 4, 5), dtype=np.uint8))


def test_save_load_round_trip_both_forms(perceiver, tmp_path):
    x = [_img(3), _img(4)]
    ref = perceiver.classify_image(x)
    perceiver.save_pretrained(tmp_path / "train", card={"name": "test bundle", "metrics": {"acc": 1.0}})
    loaded = Perceiver.from_pretrained(tmp_path / "train")
    assert loaded.classify_image(x) == ref
    assert "test bundle" in (tmp_path / "train" / "README.md").read_text()
    perceiver.reparameterize()
    perceiver.save_pretrained(tmp_path / "deploy")
    cfg = json.loads((tmp_path / "deploy" / "config.json").read_text())
    assert cfg["backbone"]["kwargs"]["deploy"] is True
    dep = Perceiver.from_pretrained(tmp_path / "deploy")
    for a, b in zip(dep.classify_image(x), ref, strict=True):
        assert [p.label for p in a] == [p.label for p in b]
        assert max(abs(p.score - q.score) for p, q in zip(a, b, strict=True)) < 1e-4
    assert dep.embed(x).shape == (2, 64) and dep.embed(x[0]).shape == (64,)


def test_half_precision_bundle_is_half_the_size_and_loads_as_float32(perceiver, tmp_path):
    x = [_img(5), _img(6)]
    full = perceiver.save_pretrained(tmp_path / "f32") / "model.safetensors"
    half = perceiver.save_pretrained(tmp_path / "f16", dtype="float16") / "model.safetensors"
    assert half.stat().st_size < 0.55 * full.stat().st_size
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["weights_dtype"] == "float16"
    assert "float16" in (tmp_path / "f16" / "README.md").read_text()
    loaded = Perceiver.from_pretrained(tmp_path / "f16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ref, got = perceiver.embed(x), loaded.embed(x)
    assert not torch.equal(ref, got)  # rounded to half precision
    torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-3)
    with pytest.raises(InvalidInputError):
        perceiver.save_pretrained(tmp_path / "bad", dtype="int8")


def test_update_card_rewrites_config_and_readme_not_weights(perceiver, tmp_path):
    d = perceiver.save_pretrained(tmp_path / "b", card={"name": "x"})
    before = (d / "model.safetensors").stat().st_mtime_ns
    cfg = up.perceiver.update_card(d, robustness={"noisy": 0.5})
    assert cfg["card"] == {"name": "x", "robustness": {"noisy": 0.5}}
    assert json.loads((d / "config.json").read_text())["card"]["robustness"] == {"noisy": 0.5}
    assert "## Robustness" in (d / "README.md").read_text()
    assert (d / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(CheckpointError):
        up.perceiver.update_card(tmp_path / "nowhere", robustness={})


def test_broken_bundles_raise_checkpoint_error(perceiver, tmp_path):
    d = perceiver.save_pretrained(tmp_path / "b")
    sd = load_file(str(d / "model.safetensors"))
    sd["head.fc.weight"] = sd["head.fc.weight"][:3]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight"):
        Perceiver.from_pretrained(d)
    del sd["head.fc.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        Perceiver.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        Perceiver.from_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        Perceiver.from_pretrained(d)
    with pytest.raises(CheckpointError, match="no bundle"):
        Perceiver.from_pretrained("no-such-bundle-name")


def test_from_official_imagenet_checkpoint(reference, tmp_path):
    io = load_file(str(reference / "vectors" / "unireplknet_a_io.safetensors"))
    src = reference / "vectors" / "unireplknet_a_random.safetensors"
    p = Perceiver.from_official("unireplknet_a", src)
    with torch.no_grad():
        torch.testing.assert_close(p(io["input"]), io["logits"], atol=1e-4, rtol=0)
    assert len(p.labels) == 1000 and p.labels[0] == "tench"
    assert p.adapter.config.size == 224 and p.adapter.config.crop_pct == 0.875
    # a deploy-form official file gives the same numbers
    dep = Perceiver.from_official("unireplknet_a", reference / "vectors" / "unireplknet_a_random_deploy.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(dep(io["input"]), io["logits_reparam"], atol=1e-4, rtol=0)
    # the official file name is enough to know the architecture
    named = tmp_path / "unireplknet_a_in1k_224_acc77.03.pth"
    torch.save({"model": load_file(str(src))}, named)
    assert Perceiver.from_pretrained(named).backbone_name == "unireplknet_a"


def test_concurrent_classification_matches_sequential(perceiver):
    imgs = [_img(i) for i in range(6)]
    expected = [perceiver.classify_image(im, top_k=2) for im in imgs]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = perceiver.classify_image(imgs[i], top_k=2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(6)] == expected


def test_concurrent_classification_of_a_model_left_in_training_mode(perceiver):
    imgs = [_img(i) for i in range(8)]
    expected = [perceiver.classify_image(im, top_k=3) for im in imgs]  # eval mode
    perceiver.train()  # e.g. right after Trainer.fit
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = perceiver.classify_image(imgs[i], top_k=3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == expected
    assert perceiver.training  # left as the caller had it


def test_head_views_pooling_loss_and_metrics():
    torch.manual_seed(0)
    cat = ClassificationHead(ClassificationHeadConfig(in_features=8, num_classes=5, views=4))
    mean = ClassificationHead(ClassificationHeadConfig(in_features=8, num_classes=5, views=4, view_pool="mean"))
    maps = torch.randn(3 * 4, 8, 2, 3)
    assert cat(maps).shape == (3, 5) and mean(maps).shape == (3, 5)
    assert cat.norm.normalized_shape == (32,) and mean.norm.normalized_shape == (8,)
    with pytest.raises(InvalidInputError):
        cat(torch.randn(5, 8, 2, 2))
    logits = torch.tensor([[5.0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0]])
    target = torch.tensor([0, 2])
    m = cat.metrics(logits, target)
    assert m["acc1"] == 0.5 and m["acc5"] == 1.0
    assert cat.loss(logits, target).item() > 0
    ml = ClassificationHead(ClassificationHeadConfig(in_features=8, num_classes=3, multi_label=True))
    assert ml.metrics(torch.tensor([[1.0, -1, 1]]), torch.tensor([[1, 0, 1]]))["subset_acc"] == 1.0
    assert torch.all((ml.probabilities(torch.zeros(1, 3)) - 0.5).abs() < 1e-6)


def test_constructor_validation():
    with pytest.raises(InvalidInputError, match="labels"):
        Perceiver("image", labels=[])
    with pytest.raises(InvalidInputError, match="unique"):
        Perceiver("image", labels=["a", "a"])
    with pytest.raises(InvalidInputError, match="modality"):
        Perceiver("smell", labels=["a"])
    with pytest.raises(InvalidInputError, match="in_chans"):
        Perceiver("image", labels=["a"], backbone_kwargs={"in_chans": 4})
