"""Synthetic keyword speech: the ten Speech Commands words spoken by ``espeak-ng`` (or ``flite``/``festival``) voices.

Every clip is one second of 16 kHz mono audio: a word synthesised by a voice (accent + variant) at a random
speed and pitch, resampled with ``sox -R`` (deterministic), trimmed, placed at a random offset (the whole word
stays inside the clip), scaled to a random peak level and mixed with synthetic background noise (white, pink,
brown, mains hum or band noise) at a random SNR. ``_silence_`` clips hold noise only (or near-digital silence);
``_unknown_`` clips hold a word from :data:`DISTRACTOR_WORDS`.

Train/val/test are split **by voice** (:func:`voice_split`), so test voices are never heard in training. A
dataset is generated on first use into the cache (``$UNIPERCEPTION_CACHE``, default ``~/.cache/uniperception``)
in a folder whose name carries a hash of every generation parameter, atomically (temporary folder + rename).

Three synthesisers, three technologies: ``espeak-ng`` (formant synthesis, 126 accent/variant voices: the main
source), ``flite`` (diphone and statistical-parametric CMU voices: the held-out "never heard" test) and
``festival`` (8 concatenative-diphone and HMM voices of other speakers, to widen training: the US-English ``ked``
and Italian, Finnish, Czech and Catalan voices saying the words from respellings, i.e. with their accent;
flite's speakers are deliberately not used from festival, so flite stays unheard).

System tools: ``apt-get install espeak-ng sox flite``, plus ``festival`` and its voices for ``synth="festival"``
(``apt-get install festival festvox-kdlpc16k festvox-itapc16k festvox-italp16k festvox-suopuhe-mv
festvox-suopuhe-lj festvox-czech-machac festvox-czech-dita festvox-ca-ona-hts``).
"""

from __future__ import annotations

import concurrent.futures
import csv
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from ._common import (
    MissingDependencyError,
    check_positive_int,
    dataset_root,
    ensure_generated,
    params_key,
    require_tools,
    split_code,
    write_json,
)

__all__ = [
    "CLASSES",
    "DISTRACTOR_WORDS",
    "ESPEAK_ACCENTS",
    "ESPEAK_VARIANTS",
    "FESTIVAL_VOICES",
    "FLITE_VOICES",
    "KEYWORDS",
    "SYNTHS",
    "KeywordSpeech",
    "list_voices",
    "voice_split",
]

logger = logging.getLogger(__name__)

#: The ten Speech Commands keywords, in Speech Commands' usual order.
KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: Label names: the keywords, then ``_silence_`` and ``_unknown_``.
CLASSES: tuple[str, ...] = (*KEYWORDS, "_silence_", "_unknown_")
#: Words spoken in ``_unknown_`` clips (Speech Commands' auxiliary words).
DISTRACTOR_WORDS: tuple[str, ...] = (
    "backward", "bed", "bird", "cat", "dog", "eight", "five", "follow", "forward", "four", "happy", "house",
    "learn", "marvin", "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "visual", "wow", "zero",
)  # fmt: skip
#: espeak-ng English accents (language voices) used.
ESPEAK_ACCENTS: tuple[str, ...] = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
)  # fmt: skip
#: espeak-ng voice variants used (each gives audibly different output; ``klatt6`` duplicates ``klatt``).
ESPEAK_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "croak", "whisper", "whisperf",
)  # fmt: skip
#: flite voices; ``kal`` and ``kal16`` are the same speaker and always share a split.
FLITE_VOICES: tuple[str, ...] = ("kal", "kal16", "awb", "rms", "slt")
_FLITE_SPEAKERS: tuple[tuple[str, ...], ...] = (("kal", "kal16"), ("awb",), ("rms",), ("slt",))
#: festival voices: voice id -> (festival voice, Debian package, language of its text front end). Only
#: speakers flite does not have: festival's ``kal`` and ``slt`` voices are flite's ``kal`` and ``slt`` speakers,
#: so using them would leak the held-out synthesiser. The non-English voices say the words from phonetic
#: respellings in their own orthography (:data:`_RESPELLINGS`): English with an Italian, Finnish, Czech or
#: Catalan accent, as a speaker of that language would say it.
_FESTIVAL: dict[str, tuple[str, str, str]] = {
    "ked": ("ked_diphone", "festvox-kdlpc16k", "en"),
    "it-pc": ("pc_diphone", "festvox-itapc16k", "it"),
    "it-lp": ("lp_diphone", "festvox-italp16k", "it"),
    "fi-mv": ("hy_fi_mv_diphone", "festvox-suopuhe-mv", "fi"),
    "fi-lj": ("suo_fi_lj_diphone", "festvox-suopuhe-lj", "fi"),
    "cs-machac": ("czech_machac", "festvox-czech-machac", "cs"),
    "cs-dita": ("czech_dita", "festvox-czech-dita", "cs"),
    "ca-ona": ("upc_ca_ona_hts", "festvox-ca-ona-hts", "ca"),
}
FESTIVAL_VOICES: tuple[str, ...] = tuple(_FESTIVAL)
# Respellings for the non-English front ends (ASCII only: the Czech front end reads ISO-8859-2). One shared
# table in Italian-like orthography (vowels a e i o u, "ai"/"au"/"ou" diphthongs), then per-language fixes.
_RESPELL_BASE: dict[str, str] = {
    "yes": "ies", "no": "nou", "up": "ap", "down": "daun", "left": "left", "right": "rait", "on": "on",
    "off": "of", "stop": "stop", "go": "gou",
    "backward": "bekuord", "bed": "bed", "bird": "berd", "cat": "ket", "dog": "dog", "eight": "eit",
    "five": "faiv", "follow": "folou", "forward": "foruord", "four": "for", "happy": "hepi", "house": "haus",
    "learn": "lern", "marvin": "marvin", "nine": "nain", "one": "uan", "seven": "seven", "sheila": "scila",
    "six": "siks", "three": "sri", "tree": "tri", "two": "tu", "visual": "vigiual", "wow": "uau", "zero": "ziro",
}  # fmt: skip
_RESPELLINGS: dict[str, dict[str, str]] = {
    "it": _RESPELL_BASE,
    "fi": {**_RESPELL_BASE, "yes": "jes", "sheila": "siila", "visual": "visual", "zero": "siro", "happy": "heppi"},
    "cs": {**_RESPELL_BASE, "yes": "jes", "sheila": "sila", "visual": "vizual"},
    "ca": {**_RESPELL_BASE, "sheila": "xila", "visual": "visual"},
}
#: Synthesisers, in the order that seeds their random streams (append only: the order is part of the data).
SYNTHS: tuple[str, ...] = ("espeak", "flite", "festival")
_TOOLS: dict[str, tuple[str, ...]] = {
    "espeak": ("espeak-ng", "sox"), "flite": ("flite", "sox"), "festival": ("festival", "text2wave", "sox"),
}  # fmt: skip

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
DEFAULT_NUM_PER_CLASS = {"train": 100, "val": 20, "test": 20, "all": 40}
NOISE_TYPES = ("white", "pink", "brown", "hum", "band")
_INSTALL = "apt-get install espeak-ng sox flite festival " + " ".join(v[1] for v in _FESTIVAL.values())
_MARKER = "manifest.csv"
_VERSION = 1  # bump when the generation procedure changes: old caches are then ignored


def _check_synth(synth: str) -> None:
    if synth not in SYNTHS:
        raise InvalidInputError(f"unknown synth {synth!r}; choose from {SYNTHS}")


def list_voices(synth: str = "espeak") -> list[str]:
    """Every voice id of a synthesiser: ``"<accent>+<variant>"`` for espeak, the speaker for flite/festival."""
    _check_synth(synth)
    if synth == "espeak":
        return [f"{a}+{v}" for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    return list(FLITE_VOICES if synth == "flite" else FESTIVAL_VOICES)


def voice_split(synth: str = "espeak", split_seed: int = 0, split_by: str = "voice") -> dict[str, str]:
    """Map every voice id to ``"train"``, ``"val"`` or ``"test"``.

    espeak, ``split_by="voice"``: within each accent the 18 variants are shuffled (seeded by ``split_seed``)
    and 2 go to test, 2 to val, 14 to train, so every accent appears in every split but no (accent, variant)
    voice is in two splits. ``split_by="variant"`` is stricter: 2 variants are test and 2 val *in every accent*,
    so a test variant's timbre is never heard in training. flite: the 4 speakers are shuffled, one is test, one
    val, two (``kal``/``kal16`` count as one speaker) train. festival is a training-only source (every voice
    ``"train"``; its val and test splits are empty): it widens training, and flite is the held-out synthesiser.
    """
    _check_synth(synth)
    if split_by not in ("voice", "variant"):
        raise InvalidInputError(f"split_by must be 'voice' or 'variant', got {split_by!r}")
    out: dict[str, str] = {}
    if synth == "espeak":
        n = len(ESPEAK_VARIANTS)
        for ai, accent in enumerate(ESPEAK_ACCENTS):
            stream = [split_seed, 0] if split_by == "variant" else [split_seed, ai + 1]
            perm = np.random.default_rng(stream).permutation(n)
            for rank, vi in enumerate(perm):
                split = "test" if rank < 2 else "val" if rank < 4 else "train"
                out[f"{accent}+{ESPEAK_VARIANTS[vi]}"] = split
        return out
    if synth == "flite":
        perm = np.random.default_rng([split_seed, 99]).permutation(len(_FLITE_SPEAKERS))
        for rank, si in enumerate(perm):
            split = "test" if rank == 0 else "val" if rank == 1 else "train"
            for v in _FLITE_SPEAKERS[si]:
                out[v] = split
        return out
    return dict.fromkeys(FESTIVAL_VOICES, "train")


@cache
def _tool_version(tool: str) -> str:
    if tool == "text2wave":  # festival's script: its version is festival's
        tool = "festival"
    try:
        res = subprocess.run([tool, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "missing"
    return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else "?"


@cache
def _festival_voices() -> frozenset[str]:
    """The voices festival has installed (``voice.list``)."""
    out = _run(["festival", "--pipe"], stdin=b"(print (voice.list))\n").decode(errors="replace")
    return frozenset(out.replace("(", " ").replace(")", " ").split())


def _require_festival_voices(voices: Sequence[str]) -> None:
    # festival silently falls back to its default voice when asked for a missing one: check first
    missing = [_FESTIVAL[v] for v in voices if _FESTIVAL[v][0] not in _festival_voices()]
    if missing:
        raise MissingDependencyError(
            f"festival voice(s) {', '.join(m[0] for m in missing)} not installed; install with: "
            f"apt-get install {' '.join(m[1] for m in missing)}"
        )


def _run(cmd: Sequence[str], stdin: bytes | None = None) -> bytes:
    try:
        res = subprocess.run(list(cmd), input=stdin, capture_output=True, check=False, timeout=120)
    except FileNotFoundError as e:  # pragma: no cover - checked earlier by require_tools
        raise MissingDependencyError(f"{cmd[0]} not found; install with: {_INSTALL}") from e
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.decode(errors='replace')}"
        )
    return res.stdout


# ---------------------------------------------------------------------------------------------------- synthesis


def _sox_to_float(src: str, stdin: bytes | None, effects: Sequence[str]) -> np.ndarray:
    """Resample (and apply ``effects``) with ``sox -R`` to 16 kHz mono float32."""
    cmd = ["sox", "-R", "-V1", *(["-t", "wav", "-"] if src == "-" else [src])]
    cmd += ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(SAMPLE_RATE), "-", *effects]
    return np.frombuffer(_run(cmd, stdin), dtype="<f4").astype(np.float64)


def _speech_extent(x: np.ndarray, floor_db: float = -40.0) -> tuple[int, int]:
    """First and one-past-last sample of the voiced part (10 ms frames above ``floor_db`` re the loudest)."""
    hop = SAMPLE_RATE // 100
    n = len(x) // hop
    if n == 0:
        return 0, len(x)
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1))
    if rms.max() <= 0:
        return 0, 0
    active = np.flatnonzero(rms > rms.max() * 10 ** (floor_db / 20))
    return int(active[0] * hop), int(min(len(x), (active[-1] + 1) * hop))


def _synthesise_word(spec: dict[str, Any], workdir: Path) -> np.ndarray:
    """The trimmed word of ``spec`` at 16 kHz, time-compressed if it would not fit in ``0.9`` s."""
    tempo = 1.0
    for _ in range(4):
        effects = ["tempo", "-s", f"{tempo:.4f}"] if tempo != 1.0 else []
        if spec["synth"] == "espeak":
            wav = _run(
                ["espeak-ng", "-v", spec["voice"], "-s", str(spec["speed"]), "-p", str(spec["pitch"]),
                 "--stdout", spec["word"]]
            )  # fmt: skip
            x = _sox_to_float("-", wav, effects)
        else:
            tmp = workdir / f"{spec['synth']}-{spec['id']}.wav"
            if spec["synth"] == "flite":
                _run(["flite", "-voice", spec["voice"], "-t", spec["word"], "-o", str(tmp)])
            else:
                voice, _, lang = _FESTIVAL[spec["voice"]]
                text = spec["word"] if lang == "en" else _RESPELLINGS[lang][spec["word"]]
                _run(["text2wave", "-eval", f"(voice_{voice})", "-o", str(tmp)], stdin=text.encode())
            # flite/festival have no speed/pitch knobs that work for every voice: sox's tempo and pitch do.
            t = tempo * spec["speed"] / 170.0
            cents = (spec["pitch"] - 50) * 8
            x = _sox_to_float(str(tmp), None, ["tempo", "-s", f"{t:.4f}", "pitch", str(cents)])
            tmp.unlink(missing_ok=True)
        a, b = _speech_extent(x)
        x = x[a:b]
        if len(x) <= int(0.9 * CLIP_SAMPLES):
            return x
        tempo *= len(x) / (0.85 * CLIP_SAMPLES)
    logger.warning("clip %s still too long after time compression: cropped", spec["id"])  # pragma: no cover
    return x[: int(0.9 * CLIP_SAMPLES)]  # pragma: no cover


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS synthetic background noise of ``kind``."""
    white = rng.standard_normal(n)
    if kind == "white":
        x = white
    elif kind in ("pink", "brown", "band"):
        spec = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        f[0] = f[1]
        if kind == "pink":
            spec /= np.sqrt(f)
        elif kind == "brown":
            spec /= f
        else:
            centre = rng.uniform(200, 4000)
            spec *= np.exp(-0.5 * (np.log(f / centre) / 0.35) ** 2)
        x = np.fft.irfft(spec, n)
    elif kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        base = rng.choice([50.0, 60.0])
        x = sum(
            rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi))
            for k in (1, 2, 3, 5)
        )
        x = x + 0.05 * white
    else:  # pragma: no cover - specs are built from NOISE_TYPES
        raise ValueError(kind)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _render_clip(spec: dict[str, Any], out_dir: Path, workdir: Path) -> dict[str, Any]:
    """Synthesise, place, scale and mix one clip; write it as 16-bit WAV; return its manifest row."""
    rng = np.random.default_rng(spec["noise_seed"])
    clip = np.zeros(CLIP_SAMPLES)
    meta = {k: spec[k] for k in ("id", "label", "label_index", "word", "voice", "speed", "pitch")}
    if spec["word"]:
        word = _synthesise_word(spec, workdir)
        peak = np.abs(word).max()
        if peak <= 0:
            raise RuntimeError(f"synthesiser produced silence for {spec}")
        word = word / peak * 10 ** (spec["peak_db"] / 20)
        offset = round(spec["offset_u"] * (CLIP_SAMPLES - len(word)))
        clip[offset : offset + len(word)] = word
        speech_rms = np.sqrt(np.mean(word**2))
        meta.update(offset=offset, word_samples=len(word))
        if spec["noise"] != "none":
            clip += _noise(spec["noise"], CLIP_SAMPLES, rng) * speech_rms / 10 ** (spec["snr_db"] / 20)
    else:
        clip += _noise(spec["noise"], CLIP_SAMPLES, rng) * 10 ** (spec["level_db"] / 20)
        meta.update(offset=0, word_samples=0)
    peak = np.abs(clip).max()
    if peak > 0.99:
        clip *= 0.99 / peak
    pcm = np.round(clip * 32767).astype(np.int16)
    rel = Path(spec["label"]) / f"{spec['id']}.wav"
    (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out_dir / rel, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    meta.update(
        file=rel.as_posix(), noise=spec["noise"], snr_db=round(spec["snr_db"], 3), level_db=round(spec["level_db"], 3),
        peak_db=round(spec["peak_db"], 3),
    )  # fmt: skip
    return meta


def _make_specs(params: dict[str, Any], voices: Sequence[str]) -> list[dict[str, Any]]:
    """Every clip's parameters, drawn from one seeded stream (independent of the number of workers)."""
    rng = np.random.default_rng(
        [params["seed"], split_code(params["split"]), SYNTHS.index(params["synth"])]
    )
    specs = []
    n_cls = len(CLASSES)
    lo_s, hi_s = params["speed_range"]
    lo_p, hi_p = params["pitch_range"]
    lo_snr, hi_snr = params["snr_range"]
    for i in range(params["num_per_class"] * n_cls):
        label_index = i % n_cls
        label = CLASSES[label_index]
        spec: dict[str, Any] = {
            "id": f"{params['split']}-{i:06d}",
            "synth": params["synth"],
            "label": label,
            "label_index": label_index,
            "voice": str(voices[int(rng.integers(len(voices)))]),
            "speed": int(rng.integers(lo_s, hi_s + 1)),
            "pitch": int(rng.integers(lo_p, hi_p + 1)),
            "peak_db": float(rng.uniform(-20.0, -1.0)),
            "offset_u": float(rng.uniform()),
            "snr_db": float(rng.uniform(lo_snr, hi_snr)),
            "noise": str(NOISE_TYPES[rng.integers(len(NOISE_TYPES))]),
            "level_db": float(rng.uniform(-60.0, -25.0)),
            "noise_seed": int(rng.integers(2**63)),
        }
        if label == "_silence_":
            spec["word"] = ""
            if rng.uniform() < 0.15:  # near-digital silence
                spec["noise"], spec["level_db"] = "white", -80.0
        else:
            spec["word"] = (
                label if label != "_unknown_" else str(DISTRACTOR_WORDS[rng.integers(len(DISTRACTOR_WORDS))])
            )
            if rng.uniform() >= params["noise_prob"]:
                spec["noise"] = "none"
        specs.append(spec)
    return specs


_FIELDS = (
    "file", "label", "label_index", "word", "voice", "speed", "pitch", "peak_db", "offset", "word_samples",
    "noise", "snr_db", "level_db", "id",
)  # fmt: skip


def _generate(
    params: dict[str, Any], voices: Sequence[str], out: Path, num_workers: int, progress: bool
) -> None:
    specs = _make_specs(params, voices)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(dir=out) as work,
        concurrent.futures.ThreadPoolExecutor(num_workers) as pool,
    ):
        # Threads suffice: the work is in the espeak-ng / flite / sox subprocesses.
        it = pool.map(lambda s: _render_clip(s, out, Path(work)), specs)
        desc = f"keywords[{params['synth']}/{params['split']}]"
        for row in tqdm(it, total=len(specs), desc=desc, unit="clip", disable=not progress):
            rows.append(row)
    write_json(out / "params.json", params)
    tmp_manifest = out / (_MARKER + ".part")
    with open(tmp_manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp_manifest, out / _MARKER)
    logger.info("synthesised %d keyword clips in %.1f s", len(rows), time.perf_counter() - t0)


class KeywordSpeech(Dataset):
    """Synthetic keyword-spotting clips: ``(waveform float32 [1, 16000], 16000, label_index)``.

    Args:
        root: parent folder of generated datasets (default ``cache_dir()/datasets/keywords``).
        split: ``"train"``, ``"val"``, ``"test"`` (disjoint voices, see :func:`voice_split`) or ``"all"``
            (every voice of the synthesiser: e.g. ``synth="flite", split="all"`` as an unseen-synthesiser test).
        num_per_class: clips per class (12 classes); default 100 for train, 20 for val/test, 40 for all.
        seed: seed of every random choice (voice, speed, pitch, level, offset, noise); same seed, same bytes.
        synth: ``"espeak"`` (126 voices: 7 accents x 18 variants), ``"flite"`` (5 voices) or ``"festival"``
            (8 voices, training only, see :func:`voice_split`).
        split_seed / split_by: the voice split (:func:`voice_split`).
        speed_range: words per minute (espeak ``-s``; for flite/festival a tempo factor ``speed / 170``).
        pitch_range: espeak ``-p`` 0..99 (for flite/festival a pitch shift of ``(pitch - 50) * 8`` cents).
        snr_range: SNR (dB) of the background noise mixed into word clips; ``noise_prob`` of them get noise.
        num_workers: synthesis threads (default: CPU count).
        progress: show a tqdm progress bar while generating.
        transform: applied to the waveform tensor; ``target_transform`` to the label index.

    Attributes: ``classes``, ``samples`` (manifest rows: file, word, voice, speed, pitch, noise, SNR, ...),
    ``targets``, ``voices`` (the voices of this split), ``path`` (the generated folder).
    """

    classes: tuple[str, ...] = CLASSES
    sample_rate: int = SAMPLE_RATE

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        num_per_class: int | None = None,
        seed: int = 0,
        synth: str = "espeak",
        *,
        split_seed: int = 0,
        split_by: str = "voice",
        speed_range: tuple[int, int] = (110, 230),
        pitch_range: tuple[int, int] = (15, 85),
        snr_range: tuple[float, float] = (5.0, 30.0),
        noise_prob: float = 0.8,
        num_workers: int | None = None,
        progress: bool = True,
        transform: Callable[[torch.Tensor], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        split_code(split)
        if num_per_class is None:
            num_per_class = DEFAULT_NUM_PER_CLASS[split]
        check_positive_int(num_per_class, "num_per_class")
        _check_synth(synth)
        if not (0 <= speed_range[0] <= speed_range[1]) or not (0 <= pitch_range[0] <= pitch_range[1] <= 99):
            raise InvalidInputError(f"bad speed_range {speed_range} or pitch_range {pitch_range}")
        if not 0.0 <= noise_prob <= 1.0 or snr_range[0] > snr_range[1]:
            raise InvalidInputError(
                f"noise_prob must be in [0, 1] and snr_range low <= high, got {noise_prob}, {snr_range}"
            )
        assignment = voice_split(synth, split_seed, split_by)
        self.voices = [v for v in list_voices(synth) if split == "all" or assignment[v] == split]
        if not self.voices:
            raise InvalidInputError(
                f"synth {synth!r} has no {split!r} voices (it is a training-only source); use split='train' or 'all'"
            )
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        params: dict[str, Any] = {
            "version": _VERSION,
            "synth": synth,
            "split": split,
            "num_per_class": num_per_class,
            "seed": seed,
            "voices": self.voices,
            "speed_range": list(speed_range),
            "pitch_range": list(pitch_range),
            "snr_range": list(snr_range),
            "noise_prob": noise_prob,
            "classes": list(CLASSES),
            "distractors": list(DISTRACTOR_WORDS),
        }
        tools = _TOOLS[synth]
        # The key leaves the tool versions out (they are recorded in params.json), so a cached dataset stays
        # usable on a machine without the tools; delete the folder to regenerate after a tool upgrade.
        name = f"{synth}-{split}-{num_per_class}pc-seed{seed}"
        self.path = dataset_root(root, "keywords") / f"{name}-{params_key(params)}"
        if not (self.path / _MARKER).is_file():
            require_tools(tools, _INSTALL)
            if synth == "festival":
                _require_festival_voices(self.voices)
            params["tools"] = {t: _tool_version(t) for t in tools}
        workers = num_workers or os.cpu_count() or 1
        ensure_generated(
            self.path, _MARKER, lambda tmp: _generate(params, self.voices, tmp, workers, progress)
        )
        with open(self.path / _MARKER, newline="") as f:
            self.samples: list[dict[str, Any]] = list(csv.DictReader(f))
        for row in self.samples:
            row["label_index"] = int(row["label_index"])
        self.targets = [row["label_index"] for row in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, Any]:
        row = self.samples[index]
        x, sr = sf.read(self.path / row["file"], dtype="float32", always_2d=True)
        wav = torch.from_numpy(np.ascontiguousarray(x.T))
        label: Any = row["label_index"]
        if self.transform is not None:
            wav = self.transform(wav)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return wav, sr, label

    def __repr__(self) -> str:
        return f"KeywordSpeech(split={self.split!r}, n={len(self)}, voices={len(self.voices)}, path={str(self.path)!r})"
