"""Shared pieces of the reliability suite: knobs, the figures registry, media writers, a tiny training set-up.

Importable from the test modules (pytest puts this directory on ``sys.path``) and from the subprocesses the
fault-injection tests start (they put it there themselves).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: hypothesis examples per fuzz test (CI default; raise it locally to fuzz harder)
FUZZ_EXAMPLES = int(os.environ.get("UNIPERCEPTION_FUZZ_EXAMPLES", "40"))
#: per-example time limit of the fuzz tests (a hang guard; generous because CI machines are shared)
FUZZ_DEADLINE_S = float(os.environ.get("UNIPERCEPTION_FUZZ_DEADLINE", "20"))
#: how many times the atomic-write tests kill their writer subprocess
KILL_ROUNDS = int(os.environ.get("UNIPERCEPTION_KILL_ROUNDS", "6"))

#: test name → outcome → count; printed at the end of the run (see conftest.py) and written as JSON
FIGURES: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def record(test: str, outcome: str, n: int = 1) -> None:
    """Count ``n`` cases of ``outcome`` for ``test`` (the doc's figures come from these counters)."""
    FIGURES[test][outcome] += n


# ------------------------------------------------------------------------------------------------ media
def write_audio_av(path: Path, x: np.ndarray, rate: int, codec: str) -> None:
    """Encode ``samples × channels`` float audio with PyAV (mp3, ogg/opus, …)."""
    import av

    layout = "stereo" if x.shape[1] == 2 else "mono"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = layout
        planar = np.ascontiguousarray(x.T)
        for i in range(0, planar.shape[1], 960):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, i : i + 960]), format="fltp", layout=layout)
            fr.sample_rate = rate
            fr.pts = i
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def write_video_av(path: Path, frames: Any, size: tuple[int, int], codec: str = "libx264", fps: int = 25) -> int:
    """Encode an iterable of ``H×W×3`` uint8 frames with PyAV; returns the frame count."""
    import av

    n = 0
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps, options={"preset": "ultrafast", "threads": "1"} if codec == "libx264" else {})
        s.height, s.width = size
        s.pix_fmt = "yuv420p"
        for f in frames:
            n += 1
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return n


def sine(freq: float, seconds: float, rate: int, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    """``samples × channels`` float32 sine."""
    t = np.arange(round(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1)


# ------------------------------------------------------------------------------------------------ training
TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "kernel_sizes": ((3,), (7,), (3,), (3,))}
CLASSES = 3


class Stripes(torch.utils.data.Dataset):
    """A tiny synthetic image set: class ``k`` is a noisy stripe pattern of orientation/period ``k``."""

    def __init__(self, n: int = 80, seed: int = 0, size: int = 16) -> None:
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, CLASSES, n)
        yy, xx = np.mgrid[0:size, 0:size]
        pats = [np.sin(xx / 2), np.sin(yy / 2), np.sin((xx + yy) / 3)]
        x = np.stack([pats[k] for k in self.y]) * 90 + 128 + rng.normal(0, 30, (n, size, size))
        self.x = np.repeat(x.clip(0, 255).astype(np.uint8)[..., None], 3, -1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.x[i], int(self.y[i])


def tiny_model(seed: int = 0) -> Any:
    from uniperception import Perceiver

    torch.manual_seed(seed)
    return Perceiver("image", labels=[f"c{i}" for i in range(CLASSES)], adapter={"size": 16, "crop_pct": 1.0},
                     backbone_kwargs=TINY)


def tiny_trainer(model: Any, out: Path, *, n: int = 80, callbacks: tuple = (), loss_fn: Any = None, **cfg: Any) -> Any:
    """A Trainer of ``model`` on :class:`Stripes` (``n`` samples, batch 16: 5 steps per epoch) writing to ``out``."""
    from uniperception.training import AdapterCollate, TrainConfig, Trainer

    config = TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_epochs": 0.5, "out_dir": str(out),
                            "progress": False, "ema_decay": 0.9, **cfg})
    return Trainer(model, Stripes(n), Stripes(32, seed=1), config, collate_fn=AdapterCollate(model.adapter, train=True),
                   val_collate_fn=AdapterCollate(model.adapter), labels=model.labels, callbacks=callbacks,
                   loss_fn=loss_fn)


def run_tiny_training(out: str, threads: int, resume: bool = False, seed: int = 0, **cfg: Any) -> Any:
    """Train the tiny model into ``out`` (used in-process and by the subprocess the kill test starts)."""
    torch.set_num_threads(threads)
    model = tiny_model(seed)
    trainer = tiny_trainer(model, Path(out), **cfg)
    trainer.fit(resume=resume)
    return trainer


def comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without the wall-clock field (the only one allowed to differ between identical runs)."""
    return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in history]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ subprocesses
def python_process(code: str, *args: str, **kwargs: Any) -> subprocess.Popen:
    """Start ``python -c code args`` with this directory and the repository importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=str(REPO), **kwargs)


# ------------------------------------------------------------------------------------------------ fault injection
@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Any:
    """An OS-level write failure without root: files of this process cannot grow past ``nbytes`` (EFBIG).

    ``RLIMIT_FSIZE`` makes ``write`` fail the way a full disk does (the process ignores SIGXFSZ meanwhile).
    """
    import resource
    import signal

    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


WRITER_DIMS = {"depths": (1, 1, 1, 1), "dims": (32, 64, 128, 256), "kernel_sizes": ((3,), (7,), (3,), (3,))}
WRITER_KINDS = ("sd.safetensors", "sd.pth", "bundle", "trainer")


def writer_model() -> Any:
    from uniperception import Perceiver

    torch.manual_seed(0)
    return Perceiver("image", labels=["a", "b"], adapter={"size": 16, "crop_pct": 1.0}, backbone_kwargs=WRITER_DIMS)


def writer_setup() -> Any:
    """The model and the trainer (optimizer and scheduler attached, as ``fit`` leaves them) the writer saves."""
    model = writer_model()
    trainer = tiny_trainer(model, Path("unused"), keep_last=2)
    trainer.optimizer = torch.optim.AdamW(model.parameters())
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    return trainer


def writer_loop(out: str, start: int, trainer: Any = None) -> None:
    """Write the four kinds of files over and over, generation ``g`` = ``start``, ``start + 1``, …

    Every tensor of generation ``g`` is filled with ``g``, so a reader can tell a whole file from a mix; the
    line ``"<g> <kind>"`` is printed once the file of that kind is in place.
    """
    from uniperception.checkpoints import save_state_dict

    torch.set_num_threads(1)
    root = Path(out)
    trainer = trainer or writer_setup()
    model = trainer.model
    trainer.out_dir = root / "run"
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    n = 1_000_000  # 4 MB per state-dict file: writes take long enough to be interrupted
    g = start
    while True:
        sd = {"w": torch.full((n,), float(g)), "g": torch.tensor(g)}
        for kind in WRITER_KINDS:
            if kind.startswith("sd."):
                save_state_dict(sd, root / kind)
            elif kind == "bundle":
                with torch.no_grad():
                    for t in model.state_dict().values():  # parameters and buffers
                        if t.is_floating_point():
                            t.fill_(float(g))
                model.save_pretrained(root / "bundle")
            else:
                trainer.epoch = g
                trainer.save_checkpoint()
            sys.stdout.write(f"{g} {kind}\n")
            sys.stdout.flush()
        g += 1


def writer_zygote() -> None:
    """Import and warm up once, then fork one :func:`writer_loop` per ``"<root> <start>"`` line on stdin.

    Prints the child's pid, then its wait status once it is gone (the test kills it). The children write their
    progress lines to ``<root>/progress.log``. Forking a warm process makes a kill round cost milliseconds
    instead of a fresh interpreter's import time, so the test can afford many rounds.
    """
    from uniperception.checkpoints import save_state_dict

    torch.set_num_threads(1)
    trainer = writer_setup()
    warm = Path(sys.argv[1]) / "warm-up"  # first calls of every writer happen here, not in the timed children
    trainer.model.save_pretrained(warm)
    save_state_dict({"w": torch.zeros(3)}, warm / "w.safetensors")
    trainer.out_dir = warm
    trainer.save_checkpoint()
    for line in sys.stdin:
        root, start = line.split()
        Path(root).mkdir(parents=True, exist_ok=True)
        pid = os.fork()
        if pid == 0:  # the writer: runs until killed
            try:
                sys.stdout = open(Path(root) / "progress.log", "a", buffering=1)
                writer_loop(root, int(start), trainer)
            finally:
                os._exit(1)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(f"{status}\n")
        sys.stdout.flush()
