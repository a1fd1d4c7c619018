"""Classify spoken keywords with the shipped bundle (or any bundle, or a tiny untrained model): WAV files or arrays.

    python examples/classify_audio.py [--bundle DIR_OR_NAME] [FILE.wav ...]

With --untrained it builds a tiny untrained UniRepLKNet audio classifier, so the scores are meaningless but the
whole path (decode → resample → Kaldi filterbank → backbone → head) runs; with no files it synthesises a
two-second 44.1 kHz stereo chirp, which the adapter mixes down, resamples and cuts into 1 s windows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from uniperception import Perceiver

sys.path.insert(0, str(Path(__file__).parent))
from _common import TINY_BACKBONE

WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_silence_", "_unknown_"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="audio files (WAV, FLAC, MP3, OGG, ...)")
    ap.add_argument("--bundle", default="unireplknet-a-keywords", help="a bundle directory or shipped name")
    ap.add_argument("--untrained", action="store_true", help="a tiny untrained model instead of the bundle")
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    model = Perceiver.from_pretrained(args.bundle) if not args.untrained else Perceiver(
        "audio", labels=WORDS, backbone_kwargs=TINY_BACKBONE)
    files = args.files
    if not files:
        t = np.arange(2 * 44100) / 44100
        chirp = 0.3 * np.sin(2 * np.pi * (300 + 400 * t) * t)
        path = Path(tempfile.mkdtemp()) / "chirp.wav"
        sf.write(path, np.stack([chirp, 0.5 * chirp], 1), 44100)
        files = [str(path)]
    for f, preds in zip(files, model.classify_audio(files, top_k=args.top_k), strict=True):
        print(f, [(p.label, round(p.score, 3)) for p in preds])
    # arrays work too, with their sample rate
    wave = np.zeros(8000, dtype=np.float32)
    print("silence:", model.classify_audio(wave, sample_rate=8000, top_k=1)[0])


if __name__ == "__main__":
    main()
