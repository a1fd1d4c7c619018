"""Load: concurrent classification equals sequential; long recordings and videos stay within bounded memory.

* 8 threads × 4 ``classify_<modality>`` calls on one small ``Perceiver`` per modality (loaded from a bundle, as
  users get it; files and arrays, single inputs and lists) give exactly the predictions of sequential calls;
* processing a 3-minute 44.1 kHz stereo WAV, a 10-minute 16 kHz WAV and a 5000-frame MP4 in a fresh subprocess
  raises its peak RSS (``VmHWM``, reset before the call) by far less than the decoded signal would take: the audio
  processor streams (decode, mix down, resample and cut windows block by block, output written in place), the
  video processor decodes and drops, keeping only the sampled frames.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from _reliability import TINY, python_process, record, sine, write_video_av

from uniperception import Perceiver

pytestmark = pytest.mark.timeout(600)

THREADS, CALLS = 8, 4


def _inputs(modality: str, d: Path) -> tuple[list[Any], dict[str, Any]]:
    rng = np.random.default_rng(0)
    if modality == "image":
        return [rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(7)] + [_png(d, rng)], {}
    if modality == "audio":
        sf.write(d / "a.wav", sine(880, 1.7, 22050, channels=2), 22050)
        return [rng.standard_normal(16000 + 4000 * i).astype(np.float32) * 0.1 for i in range(7)] + [d / "a.wav"], {
            "sample_rate": 16000}
    if modality == "video":
        frames = [rng.integers(0, 255, (20, 28, 3), dtype=np.uint8) for _ in range(10)]
        write_video_av(d / "v.mp4", frames, (20, 28))
        return [rng.integers(0, 255, (6 + i, 20, 24, 3), dtype=np.uint8) for i in range(7)] + [d / "v.mp4"], {}
    if modality == "points":
        return [rng.standard_normal((100 + 50 * i, 3)) for i in range(8)], {}
    return [np.sin(np.arange(64 + 8 * i) / (3 + i)) + 0.1 * rng.standard_normal(64 + 8 * i) for i in range(8)], {}


def _png(d: Path, rng: np.random.Generator) -> Path:
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (25, 35, 3), dtype=np.uint8)).save(d / "i.png")
    return d / "i.png"


ADAPTERS = {
    "image": {"size": 32},
    "audio": {},
    "video": {"num_frames": 4, "size": 16},
    "points": {"num_points": 64, "image_size": 32},
    "series": {"lookback": 48, "layout": "period", "hop": 8},
}


@pytest.mark.parametrize("modality", sorted(ADAPTERS))
def test_concurrent_classification_equals_sequential(modality: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    built = Perceiver(modality, labels=[f"c{i}" for i in range(5)], adapter=ADAPTERS[modality], backbone_kwargs=TINY)
    model = Perceiver.from_pretrained(built.save_pretrained(tmp_path / "bundle"))
    classify = getattr(model, f"classify_{modality}")
    inputs, kw = _inputs(modality, tmp_path)
    expected = [classify(x, top_k=5, **kw) for x in inputs]
    expected_list = classify(inputs[:3], top_k=5, **kw)
    results: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for c in range(CALLS):
                if c == CALLS - 1 and t % 2:
                    results[(t, c)] = classify(inputs[:3], top_k=5, **kw)
                else:
                    results[(t, c)] = classify(inputs[(t + c) % len(inputs)], top_k=5, **kw)
        except BaseException as e:  # reported below, with the thread's result missing
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    mismatches = 0
    for (t, c), got in results.items():
        want = expected_list if (c == CALLS - 1 and t % 2) else expected[(t + c) % len(inputs)]
        mismatches += got != want
    assert len(results) == THREADS * CALLS
    assert mismatches == 0, f"{mismatches} of {len(results)} concurrent calls differ from the sequential ones"
    record("load/concurrent-classify", f"{modality}: calls equal to sequential", len(results))


# ------------------------------------------------------------------------------------------------ memory
MEM_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from uniperception.adapters import AudioAdapter, VideoAdapter, VideoConfig
kind, path, warm = sys.argv[1:4]
ad = AudioAdapter() if kind == "audio" else VideoAdapter(VideoConfig(num_frames=8, size=64))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
ad.preprocess(warm)  # imports and first-call allocations happen before the measurement
try:  # reset the peak-RSS mark (VmHWM) to the current RSS: the import peak must not hide the processing peak
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    print(json.dumps({"skip": "cannot reset the peak RSS (/proc/self/clear_refs)"}))
    sys.exit(0)
before = status("VmRSS")
t0 = time.perf_counter()
out = ad.preprocess(path)
seconds = time.perf_counter() - t0
result = {"growth": status("VmHWM") - before, "output": out.numel() * out.element_size(), "seconds": seconds,
          "shape": list(out.shape)}
if kind == "audio" and len(sys.argv) > 4:  # the streamed result equals processing the whole decoded signal
    import soundfile as sf
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    whole = ad.preprocess(x.T.copy(), sample_rate=rate)
    result["max_abs_diff_vs_whole_signal"] = float((whole - out).abs().max()) if whole.shape == out.shape else None
print(json.dumps(result))
"""


def _measure(kind: str, path: Path, warm: Path, compare: bool = False) -> dict[str, Any]:
    proc = python_process(MEM_CHILD, kind, str(path), str(warm), *(["compare"] if compare else []),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=540)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def _long_audio(path: Path, minutes: float, rate: int, channels: int) -> int:
    """Write a ``minutes``-long PCM-16 WAV block by block (the test process never holds it either)."""
    n = round(minutes * 60 * rate)
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, subtype="PCM_16") as f:
        for start in range(0, n, rate * 10):
            t = np.arange(start, min(n, start + rate * 10)) / rate
            tone = 0.3 * np.sin(2 * np.pi * (300 + 200 * np.sin(t / 7)) * t)
            block = tone[:, None] + 0.02 * rng.standard_normal((len(t), channels))
            f.write(block.astype(np.float32))
    return n


@pytest.mark.parametrize(
    ("minutes", "rate", "channels"),
    [pytest.param(3, 44100, 2, id="3min-44.1kHz-stereo"),
     pytest.param(10, 16000, 1, id="10min-16kHz-mono")],
)
def test_long_audio_memory_is_bounded(minutes: int, rate: int, channels: int, tmp_path: Path) -> None:
    from uniperception.adapters import AudioAdapter

    path = tmp_path / "long.wav"
    n = _long_audio(path, minutes, rate, channels)
    sf.write(tmp_path / "warm.wav", sine(440, 2.0, rate, channels), rate)
    r = _measure("audio", path, tmp_path / "warm.wav", compare=minutes <= 3)
    decoded = n * channels * 4  # the float32 signal a decode-everything processor holds (before mix-down)
    windows = len(AudioAdapter().window_starts(math.ceil(n * 16000 / rate)))
    assert r["shape"] == [windows, 1, 128, 98]
    extra = r["growth"] - r["output"]
    assert extra < decoded / 4, (
        f"peak RSS grew {r['growth'] / 2**20:.1f} MiB for a {r['output'] / 2**20:.1f} MiB output: "
        f"{extra / 2**20:.1f} MiB beyond it, the decoded signal is {decoded / 2**20:.1f} MiB"
    )
    if "max_abs_diff_vs_whole_signal" in r:
        assert r["max_abs_diff_vs_whole_signal"] is not None and r["max_abs_diff_vs_whole_signal"] < 1e-3, r
    record("load/memory", f"{minutes} min {rate} Hz ×{channels} WAV: decoded {decoded / 2**20:.0f} MiB, "
           f"output {r['output'] / 2**20:.1f} MiB, peak RSS +{r['growth'] / 2**20:.1f} MiB, {r['seconds']:.1f} s")


def test_long_video_memory_is_bounded(tmp_path: Path) -> None:
    n, side = 5000, 96

    def frames() -> Any:
        base = np.zeros((side, side, 3), np.uint8)
        for i in range(n):
            f = base.copy()
            f[..., 0] = i % 256
            f[:, i % side, 1] = 255
            yield f

    write_video_av(tmp_path / "long.mp4", frames(), (side, side))
    write_video_av(tmp_path / "warm.mp4", (np.zeros((side, side, 3), np.uint8) for _ in range(20)), (side, side))
    r = _measure("video", tmp_path / "long.mp4", tmp_path / "warm.mp4")
    decoded = n * side * side * 3  # uint8 RGB frames (float32 would be 4× more)
    assert r["shape"] == [1, 3, 8, 64, 64]
    assert r["growth"] < decoded / 10, (
        f"peak RSS grew {r['growth'] / 2**20:.1f} MiB; all {n} frames decoded are {decoded / 2**20:.0f} MiB"
    )
    record("load/memory", f"{n}-frame {side}² MP4: decoded {decoded / 2**20:.0f} MiB (uint8), "
           f"peak RSS +{r['growth'] / 2**20:.1f} MiB, {r['seconds']:.1f} s")
