"""A second evaluation corpus, unlike the demo's synthesiser: real text-to-speech voices acting
emotion through prosody alone.

    synthesize_speech(out_dir, n_speakers=10, clips_per_speaker=24, seed=0)

writes

    OUT/audio/<speaker>/<clip>.wav        16 kHz mono, 16-bit, 1.5-4 s
    OUT/manifest.csv                      path, speaker, label, valence, arousal, intensity
    OUT/speech.json                       format, settings, speakers, counts
    OUT_snr10/, OUT_snr0/                 noisy twins: the same files with pink noise at 10 / 0 dB SNR
                                          (same relative paths, so the clips share ids across stores)

How a clip is made:

1. Festival (Debian packages `festival`, `festvox-kallpc16k`, `festvox-kdlpc16k`,
   `festvox-us-slt-hts`; `make speech-corpus` installs them) reads one of `SENTENCES` in one of
   three voices: two diphone voices (male) and one HTS voice (female). Pauses are written into the
   text as commas.
2. Praat's "Change gender" (through `praat-parselmouth`) resynthesises it by overlap-add with:
   - the speaker's formant shift and pitch median, so each voice yields several speakers;
   - the emotion's pitch level, pitch range and duration, scaled by the clip's intensity, which is
     drawn uniformly from [0.25, 1]. Weak clips sit close to neutral, so the classes overlap.
3. A spectral tilt (brighter for angry, duller for sad) and a loudness change finish the clip.

Emotion profiles follow the acted-speech literature (e.g. Murray & Arnott 1993): happy has a higher,
wider pitch and is faster; angry has a higher pitch, is faster, louder and brighter; sad has a lower,
narrower pitch, is slower, quieter and duller, with more pauses; neutral is the speaker's own voice.
Valence and arousal follow the class, scaled by intensity, with noise.

Every clip draws from its own RNG seeded by (seed, speaker, clip), so the corpus is the same
whatever the number of worker processes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vqmae import __version__
from vqmae.audio import NoiseSpec, add_noise, wav_bytes
from vqmae.utils import atomic_write_bytes, atomic_write_json

FORMAT = "vqmae-speech-corpus/1"
RATE = 16000
VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
PACKAGES = ("festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts")
NOISY_SNRS = (10.0, 0.0)
MANIFEST_COLUMNS = ("path", "speaker", "label", "valence", "arousal", "intensity")

SENTENCES = (
    "The train leaves from the north station at seven in the morning.",
    "I put the blue folder on the table next to the window.",
    "We talked about it for a while and then we went home.",
    "She said the results would be ready by the end of the week.",
    "There is a small bakery at the corner of the second street.",
    "He opened the door and looked at the empty room.",
    "They moved the meeting to the room on the third floor.",
    "My brother bought a new bicycle last summer.",
    "The letter arrived two days after we had called them.",
    "You can leave your coat in the hall if you like.",
    "It rained all afternoon, so we stayed inside and read.",
    "The numbers on the screen changed every few seconds.",
)


@dataclass(frozen=True)
class Emotion:
    """Deviations from the speaker's neutral voice at full intensity."""

    name: str
    pitch: float  # pitch median factor
    range: float  # pitch range factor
    duration: float  # duration factor (> 1: slower)
    gain_db: float
    tilt: float  # > 0 brighter (first-difference boost), < 0 duller (one-pole low-pass)
    pauses: float  # probability of a pause at each word boundary
    valence: float
    arousal: float


EMOTIONS = (
    Emotion("neutral", 1.00, 1.00, 1.00, 0.0, 0.0, 0.05, 0.0, 0.0),
    Emotion("happy", 1.25, 1.80, 0.88, 3.0, 0.3, 0.03, 0.7, 0.5),
    Emotion("sad", 0.86, 0.45, 1.30, -6.0, -0.5, 0.25, -0.6, -0.6),
    Emotion("angry", 1.15, 1.40, 0.85, 6.0, 0.6, 0.05, -0.6, 0.8),
)


@dataclass(frozen=True)
class Speaker:
    name: str
    voice: str
    formant: float  # formant shift ratio (vocal-tract length)
    pitch_median: float  # Hz, neutral
    range: float  # pitch range factor, neutral
    duration: float  # speaking rate factor, neutral


class SpeechCorpusError(RuntimeError):
    """The corpus cannot be made (festival or a voice missing, a non-empty output folder, ...)."""


def _rng(seed: int, *key: object) -> np.random.Generator:
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def make_speakers(n: int, seed: int) -> list[Speaker]:
    """`n` speakers spread over the voices in turn, each with its own formants, pitch and rate."""
    base = {"kal_diphone": 105.0, "ked_diphone": 100.0, "cmu_us_slt_arctic_hts": 175.0}
    out = []
    for i in range(n):
        voice = VOICES[i % len(VOICES)]
        r = _rng(seed, "speaker", i)
        out.append(Speaker(f"sp{i:02d}", voice, float(r.uniform(0.9, 1.12)),
                           float(base[voice] * r.uniform(0.85, 1.2)), float(r.uniform(0.8, 1.25)),
                           float(r.uniform(0.9, 1.1))))
    return out


def check_festival(voices: tuple[str, ...] = VOICES) -> None:
    """Raise `SpeechCorpusError` naming what to install when text2wave or a voice is missing."""
    if shutil.which("text2wave") is None:
        raise SpeechCorpusError(f"festival's text2wave is not installed: `make speech-corpus` installs it "
                                f"(apt-get install {' '.join(PACKAGES)})")
    for v in voices:
        try:
            _festival(SENTENCES[0][:20], v)
        except SpeechCorpusError as e:
            raise SpeechCorpusError(f"festival voice {v} does not work ({e}); install {' '.join(PACKAGES)}") from None


def _festival(text: str, voice: str) -> np.ndarray:
    """Festival's reading of `text` in `voice` → float64 [n] at `RATE`."""
    import parselmouth

    with tempfile.TemporaryDirectory(prefix="vqmae-festival-") as d:
        src, wav = Path(d) / "in.txt", Path(d) / "out.wav"
        src.write_text(text)
        res = subprocess.run(["text2wave", "-eval", f"(voice_{voice})", str(src), "-o", str(wav)],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or not wav.exists() or wav.stat().st_size < 1000:
            raise SpeechCorpusError(f"text2wave failed for voice {voice}: "
                                    f"{(res.stderr or res.stdout).strip().splitlines()[-1:] or 'no output'}")
        sound = parselmouth.Sound(str(wav))
    if sound.sampling_frequency != RATE:
        sound = sound.resample(RATE)
    return np.asarray(sound.values[0], np.float64)


def _text(sentence: str, pauses: float, rng: np.random.Generator) -> str:
    words = sentence.rstrip(".").split()
    out = [w + ("," if rng.random() < pauses and i < len(words) - 1 and not w.endswith(",") else "")
           for i, w in enumerate(words)]
    return " ".join(out) + "."


def _tilt(x: np.ndarray, amount: float) -> np.ndarray:
    if amount > 0:  # brighter: add the first difference (a high-frequency boost)
        return x + amount * np.diff(x, prepend=x[:1]) * 4.0
    if amount < 0:  # duller: a one-pole low-pass mixed in
        from scipy.signal import lfilter

        low = lfilter([0.2], [1.0, -0.8], x)
        return (1 + amount) * x + (-amount) * low * 2.0
    return x


def make_clip(speaker: Speaker, index: int, seed: int) -> tuple[np.ndarray, dict]:
    """One clip of `speaker` → (float32 [n] at `RATE`, its manifest fields)."""
    import parselmouth
    from parselmouth.praat import call, run

    r = _rng(seed, "clip", speaker.name, index)
    emo = EMOTIONS[index % len(EMOTIONS)]
    u = float(r.uniform(0.25, 1.0))  # intensity: how far from neutral

    def toward(full: float, neutral: float = 1.0) -> float:
        return neutral + u * (full - neutral)

    sentence = SENTENCES[int(r.integers(len(SENTENCES)))]
    raw = _festival(_text(sentence, toward(emo.pauses, 0.05), r), speaker.voice)
    sound = parselmouth.Sound(raw, sampling_frequency=RATE)
    jitter = float(r.normal(1.0, 0.03))  # clip-to-clip variation of the same speaker
    # Praat's overlap-add draws random numbers: seed them from the clip, or runs would differ
    run(f"random_initializeWithSeedUnsafelyButPredictably ({int(r.integers(1, 2**31))})")
    try:
        out = call(sound, "Change gender", 60, 600, speaker.formant,
                   speaker.pitch_median * toward(emo.pitch) * jitter, speaker.range * toward(emo.range),
                   speaker.duration * toward(emo.duration))
    finally:
        run("random_initializeSafelyAndUnpredictably ()")
    x = np.asarray(out.values[0], np.float64)
    x = _tilt(x, u * emo.tilt)
    x = 0.3 * x / (np.abs(x).max() + 1e-9) * 10 ** (u * emo.gain_db / 20)  # peak 0.3 at neutral
    fields = {"label": emo.name, "intensity": round(u, 4),
              "valence": round(float(np.clip(u * emo.valence + r.normal(0, 0.1), -1, 1)), 4),
              "arousal": round(float(np.clip(u * emo.arousal + r.normal(0, 0.1), -1, 1)), 4)}
    return np.clip(x, -1, 1).astype(np.float32), fields


def _write_one(job: tuple[Speaker, int, int, str, tuple[float, ...]]) -> dict:
    speaker, index, seed, out, snrs = job
    wave, fields = make_clip(speaker, index, seed)
    rel = f"audio/{speaker.name}/{speaker.name}_{index:03d}.wav"
    atomic_write_bytes(Path(out) / rel, wav_bytes(wave, RATE))
    for snr in snrs:  # the same noise for a clip in every run: seeded by (seed, clip id)
        noisy = add_noise(wave, NoiseSpec(snr, "pink", seed), rel)
        atomic_write_bytes(Path(f"{out}_snr{snr:g}") / rel, wav_bytes(np.clip(noisy, -1, 1), RATE))
    return {"path": rel, "speaker": speaker.name, **fields}


def synthesize_speech(out_dir: str | Path, *, n_speakers: int = 10, clips_per_speaker: int = 24,
                      seed: int = 0, workers: int = 1, noisy_snrs: tuple[float, ...] = NOISY_SNRS,
                      overwrite: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the corpus (see the module docstring); returns its manifest path. `progress(done,
    total)` is called after each clip."""
    out = Path(out_dir)
    if n_speakers < 2 or clips_per_speaker < len(EMOTIONS):
        raise SpeechCorpusError(f"need at least 2 speakers and {len(EMOTIONS)} clips per speaker")
    for d in [out] + [Path(f"{out}_snr{s:g}") for s in noisy_snrs]:
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise SpeechCorpusError(f"{d} is not empty; pass --force to replace the corpus there")
            shutil.rmtree(d)
    check_festival()
    speakers = make_speakers(n_speakers, seed)
    jobs = [(s, i, seed, str(out), tuple(noisy_snrs)) for s in speakers for i in range(clips_per_speaker)]
    rows = []
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for row in (pool.map(_write_one, jobs, chunksize=4) if pool else map(_write_one, jobs)):
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(jobs))
    summary = {"format": FORMAT, "vqmae_version": __version__, "seed": seed,
               "speakers": [asdict(s) for s in speakers], "emotions": [asdict(e) for e in EMOTIONS],
               "clips": len(rows), "noisy_snrs": list(noisy_snrs)}
    for d in [out] + [Path(f"{out}_snr{s:g}") for s in noisy_snrs]:
        atomic_write_bytes(d / "manifest.csv", _manifest(rows))
        atomic_write_json(d / "speech.json", summary)
    return out / "manifest.csv"


def _manifest(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def read_speech_summary(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "speech.json").read_text())
