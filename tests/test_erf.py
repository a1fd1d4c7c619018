"""Effective receptive field: larger kernels → larger ERF, symmetric models → symmetric maps, exact area ratios."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from uniperception.analysis import THRESHOLDS, ERFResult, area_ratios, erf, generated_images, save_erf_grid
from uniperception.backbones import SLaK
from uniperception.errors import InvalidInputError


def _sym(w: Tensor) -> Tensor:
    """Make a kernel symmetric under left-right and up-down flips."""
    return (w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4


class PlainNet(nn.Module):
    """One macro-architecture, any kernel: 4×4/4 patchify stem, two stages of (depthwise k×k → GELU → 1×1)
    blocks with a 2×2/2 downsampling between them (final stride 8), no residuals.

    With ``symmetric=True`` every kernel is mirror-symmetric, so the network is flip-equivariant.
    """

    def __init__(self, kernels: tuple[int, int], width: int = 16, blocks: int = 2, symmetric: bool = False,
                 seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.stages = nn.ModuleList()
        for k in kernels:
            layers: list[nn.Module] = []
            for _ in range(blocks):
                layers += [nn.Conv2d(width, width, k, padding=k // 2, groups=width), nn.GELU(),
                           nn.Conv2d(width, width, 1), nn.GELU()]
            self.stages.append(nn.Sequential(*layers))
        self.down = nn.Conv2d(width, width, 2, stride=2)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m.groups > 1:
                    nn.init.normal_(m.weight, 1.0 / m.kernel_size[0] ** 2, 0.3 / m.kernel_size[0] ** 2)
                if isinstance(m, nn.Conv2d) and symmetric:
                    m.weight.copy_(_sym(m.weight))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages[1](self.down(self.stages[0](self.stem(x))))


def _images(n: int = 3, size: int = 72) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return F.avg_pool2d(torch.randn(n, 3, size + 2, size + 2, generator=g), 3, stride=1)


def test_larger_kernels_give_a_larger_erf():
    x = _images()
    results = [erf(PlainNet(k), x, model_name=str(k)) for k in ((3, 3), (13, 13), (31, 13))]
    small, mid, large = (r.ratios for r in results)
    for t in (0.2, 0.3, 0.5):
        assert small[t] < mid[t] < large[t], (t, small, mid, large)
    assert small[0.99] <= mid[0.99] <= large[0.99]
    assert small[0.99] < 0.6 < large[0.99]  # 3×3 kernels: theoretical RF 52 px of 72


def test_symmetric_model_gives_a_symmetric_centred_map():
    r = erf(PlainNet((7, 5), symmetric=True), _images(4), model_name="sym")
    a = r.scores
    for flipped in (a[:, ::-1], a[::-1, :], a[::-1, ::-1]):
        assert np.corrcoef(a.ravel(), flipped.ravel())[0, 1] > 0.9
    ys, xs = np.mgrid[: a.shape[0], : a.shape[1]]
    centre = (a.shape[0] - 1) / 2
    assert abs((a * ys).sum() / a.sum() - centre) < 1.0 and abs((a * xs).sum() / a.sum() - centre) < 1.0


def test_area_ratios_exact_and_monotone():
    uniform = np.ones((101, 101))
    ratios, sides = area_ratios(uniform, (0.2, 0.5))
    # the smallest odd centred square holding more than t of a uniform map: 45² < 0.2·101² < 47², 71² < 0.5·101² < 73²
    assert sides == {0.2: 47, 0.5: 73}
    assert ratios[0.5] == pytest.approx(73 * 73 / 101**2)
    delta = np.zeros((64, 64))
    delta[32, 32] = 5.0
    assert area_ratios(delta)[1] == dict.fromkeys(THRESHOLDS, 3)  # the official loop starts at side 3
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = rng.gamma(0.5, size=(48, 48)) * np.exp(-((np.mgrid[:48, :48] - 24) ** 2).sum(0) / rng.uniform(20, 400))
        ratios, sides = area_ratios(m, (0.1, 0.2, 0.3, 0.5, 0.8, 0.99))
        assert list(ratios.values()) == sorted(ratios.values())
        assert all(0 < v <= 1 for v in ratios.values())
    # log10(A + 1) first, as RepLKNet: the scale of the scores matters
    g = np.exp(-((np.mgrid[:65, :65] - 32) ** 2).sum(0) / 200.0)
    assert area_ratios(g * 1e4)[0][0.5] > area_ratios(g * 1e-4)[0][0.5]


def test_result_png_grid_and_real_backbones(tmp_path):
    model = SLaK(num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_size=(13, 11, 9, 7, 3),
                 width_factor=1.0)
    r = erf(model, input_size=64, num_images=3, batch_size=2, model_name="tiny SLaK")
    assert isinstance(r, ERFResult) and r.scores.shape == (64, 64) and r.num_images == 3
    assert list(r.ratios) == list(THRESHOLDS) and list(r.ratios.values()) == sorted(r.ratios.values())
    assert r.log_map.max() == pytest.approx(1.0) and "tiny SLaK" in r.summary()
    png = r.save_png(tmp_path / "erf.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = save_erf_grid([r, r], tmp_path / "grid.png", titles=["a", "b"])
    assert grid.stat().st_size > png.stat().st_size / 2
    assert np.load(r.save_npy(tmp_path / "erf.npy")).shape == (64, 64)
    # batching does not change the map in eval mode; the model's mode is restored
    model.train()
    r1 = erf(model, input_size=64, num_images=3, batch_size=1)
    assert model.training and np.allclose(r1.scores, r.scores, rtol=1e-5, atol=1e-12)
    # a timm model by name (random weights), through forward_features
    pytest.importorskip("timm")
    rt = erf("resnet18", input_size=64, num_images=1)
    assert rt.model_name == "resnet18" and np.isfinite(rt.scores).all()


def test_image_directory_and_generated_inputs(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    r = erf(PlainNet((3, 3)), tmp_path, input_size=40, num_images=10)
    assert r.num_images == 3 and r.scores.shape == (40, 40)
    x = generated_images(48, 4)
    assert x.shape == (4, 3, 48, 48) and torch.isfinite(x).all()
    assert abs(float(x.mean())) < 1.0  # ImageNet-normalised
    r = erf(PlainNet((3, 3)), None, input_size=48, num_images=2)
    assert r.num_images == 2


def test_bad_inputs_raise_clear_errors(tmp_path):
    net = PlainNet((3, 3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no images in"):
        erf(net, tmp_path / "empty", input_size=64)
    with pytest.raises(InvalidInputError, match="does not exist"):
        erf(net, tmp_path / "missing", input_size=64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InvalidInputError, match=r"cannot read image .*broken\.jpg"):
        erf(net, tmp_path / "bad", input_size=64)
    with pytest.raises(InvalidInputError, match="input_size must be an integer of at least 32"):
        erf(net, input_size=16)
    with pytest.raises(InvalidInputError, match="too small"):
        erf(net, torch.zeros(1, 3, 16, 16))
    with pytest.raises(InvalidInputError, match=r"N × C × H × W"):
        erf(net, torch.zeros(3, 64, 64))
    with pytest.raises(InvalidInputError, match="num_images"):
        erf(net, input_size=64, num_images=0)
    with pytest.raises(InvalidInputError, match="forward_features"):
        erf(nn.Conv2d(3, 3, 3), input_size=64)
    slak = SLaK(num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_size=(5, 5, 5, 5, 3),
                width_factor=1.0)
    with pytest.raises(InvalidInputError, match="input channels"):
        erf(slak, torch.zeros(1, 1, 64, 64))
    with pytest.raises(InvalidInputError, match="unknown model"):
        erf("no_such_model_anywhere", input_size=64)
