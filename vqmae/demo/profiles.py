"""Who speaks and how they feel: the emotion profiles and the seeded speakers of the demo corpus.

An `Emotion` holds every cue of one class, voice (pitch, rate, loudness, phonation, pauses) and face
(jaw gain, head motion, local warp handles); a `Speaker` holds one voice and one appearance, drawn
from the speaker's own RNG. Both are shared by the voice synthesiser (`voice`), the face renderer
(`face`) and the corpus writer (`corpus`), so they live below all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vqmae.config import SynthConfig

FPS = 25  # video frame rate; a frame carries audio_rate // FPS samples of the voice


# --------------------------------------------------------------------------------------------------
# Emotion profiles
# --------------------------------------------------------------------------------------------------

# (x, y, dx, dy, sigma) in astronaut() pixel coordinates: content near (x, y) moves by (dx, dy).
Handle = tuple[float, float, float, float, float]


@dataclass(frozen=True)
class Emotion:
    pitch_st: float  # pitch level, semitones above the speaker's base
    range_st: float  # height of word accents, semitones
    rate: float  # syllables per second
    loud_db: float  # speech level relative to neutral
    open_quotient: float  # low = pressed / harsh (strong harmonics), high = breathy / soft
    breath: float  # aspiration noise relative to the voiced source
    jitter: float  # relative f0 perturbation
    shimmer: float  # relative per-period amplitude perturbation
    formant: float  # formant frequency scale (smiling raises, sad lowers)
    pause: float  # pause length scale between words
    tremor: float  # 6 Hz pitch tremor depth, semitones
    mouth: float  # jaw opening gain
    head: float  # head-motion amplitude gain
    jaw: float  # jaw opening held through the clip (surprise)
    vad: tuple[float, float, float]  # valence, arousal, dominance
    face: tuple[Handle, ...] = ()


# Landmarks of skimage.data.astronaut() (512 × 512), read off the image.
_EYE = ((202.0, 101.0), (247.0, 103.5))
_BROW_IN = ((216.0, 91.0), (236.0, 93.0))
_BROW_MID = ((205.0, 88.0), (247.0, 92.0))
_BROW_OUT = ((194.0, 89.0), (259.0, 95.0))
_MOUTH = ((204.0, 140.0), (244.0, 141.0))
_CHEEK = ((195.0, 127.0), (253.0, 129.0))
_UPPER_LIP = (224.0, 139.0)
_LOWER_LIP = (224.0, 154.0)
_NOSE = (224.0, 128.0)


def _pair(points, d: tuple[float, float], sigma: float) -> tuple[Handle, Handle]:
    """Mirror-symmetric handles: `d` is the displacement of the image-left point."""
    (xl, yl), (xr, yr) = points
    return (xl, yl, d[0], d[1], sigma), (xr, yr, -d[0], d[1], sigma)


def _lids(dy: float) -> tuple[Handle, Handle]:
    return _pair(((_EYE[0][0], _EYE[0][1] - 4), (_EYE[1][0], _EYE[1][1] - 4)), (0.0, dy), 4.0)


EMOTIONS: dict[str, Emotion] = {
    "neutral": Emotion(0.0, 2.5, 4.4, 0.0, 0.60, 0.06, 0.005, 0.03, 1.00, 1.0, 0.0, 1.0, 1.0, 0.0,
                       (0.0, 0.0, 0.0),
                       _pair(_MOUTH, (0.5, 2.5), 7.0)),
    "happy": Emotion(3.0, 6.0, 5.0, 2.0, 0.55, 0.04, 0.006, 0.04, 1.05, 0.9, 0.0, 1.1, 1.2, 0.0,
                     (0.7, 0.5, 0.3),
                     _pair(_MOUTH, (-2.0, -4.0), 8.0) + _pair(_CHEEK, (0.0, -2.5), 10.0)
                     + _pair(((202.0, 106.0), (247.0, 108.5)), (0.0, -1.5), 4.0)),
    "sad": Emotion(-2.5, 1.0, 3.1, -7.0, 0.75, 0.22, 0.006, 0.04, 0.96, 1.7, 0.0, 0.7, 0.6, 0.0,
                   (-0.6, -0.5, -0.4),
                   _pair(_MOUTH, (1.5, 5.0), 8.0) + _pair(_BROW_IN, (0.0, -3.5), 6.0)
                   + _pair(_BROW_OUT, (0.0, 2.0), 6.0) + _lids(1.5)
                   + ((*_LOWER_LIP, 0.0, -1.5, 6.0),)),
    "angry": Emotion(2.5, 4.0, 5.8, 7.0, 0.40, 0.06, 0.015, 0.12, 1.06, 0.7, 0.0, 1.3, 1.3, 0.0,
                     (-0.6, 0.7, 0.6),
                     _pair(_BROW_IN, (3.0, 4.5), 7.0) + _pair(_BROW_MID, (1.0, 3.0), 8.0)
                     + _pair(_MOUTH, (2.5, 1.0), 6.0) + ((*_LOWER_LIP, 0.0, -2.0, 6.0),)),
    "fearful": Emotion(5.0, 3.0, 5.5, -1.0, 0.65, 0.15, 0.02, 0.06, 1.03, 1.1, 0.5, 0.9, 1.1, 0.0,
                       (-0.6, 0.6, -0.5),
                       _pair(_BROW_IN, (1.5, -4.0), 7.0) + _pair(_BROW_OUT, (0.0, -2.0), 7.0)
                       + _lids(-1.5) + _pair(_MOUTH, (-3.0, 1.5), 7.0)),
    "surprised": Emotion(4.0, 8.0, 4.5, 3.0, 0.55, 0.06, 0.006, 0.04, 1.05, 1.0, 0.0, 1.0, 1.1, 0.35,
                         (0.3, 0.8, 0.0),
                         _pair(_BROW_IN, (0.0, -5.5), 9.0) + _pair(_BROW_OUT, (0.0, -5.0), 9.0)
                         + _lids(-1.5)),
    "disgust": Emotion(-1.0, 3.0, 3.5, -1.0, 0.55, 0.10, 0.01, 0.08, 0.98, 1.3, 0.0, 0.8, 0.9, 0.0,
                       (-0.6, 0.2, 0.3),
                       ((*_UPPER_LIP, 0.0, -2.5, 6.0), (*_NOSE, 0.0, -1.5, 6.0))
                       + _pair(_BROW_IN, (1.5, 2.5), 7.0) + _pair(_MOUTH, (0.5, 2.5), 7.0)),
    "calm": Emotion(-1.0, 1.8, 3.8, -4.0, 0.68, 0.10, 0.004, 0.03, 1.00, 1.3, 0.0, 0.8, 0.7, 0.0,
                    (0.4, -0.6, 0.1),
                    _pair(_MOUTH, (-0.5, -1.5), 7.0) + _lids(1.2)),
}


# --------------------------------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speaker:
    index: int
    name: str
    f0: float  # base pitch, Hz
    formant_scale: float  # vocal tract length: higher voices get higher formants
    rate_scale: float
    breath: float
    mirror: bool
    scale: float  # face size in the frame
    aspect: float  # horizontal stretch of the whole face
    offset: tuple[float, float]  # face position, fraction of the frame side
    skin: tuple[float, float, float]  # per-channel gains
    hair: tuple[float, float, float]
    background: tuple[tuple[float, float, float], tuple[float, float, float]]  # top, bottom RGB
    chin: float  # chin length change, astronaut px
    eye_spread: float  # eye distance change, astronaut px


def _rng(cfg: SynthConfig, tag: int, speaker: int, clip: int) -> np.random.Generator:
    # One stream per tag: 0 a speaker's traits, 1 a clip's parameters and voice, 2 its head motion.
    # Fixed-length entropy: SeedSequence treats trailing zeros as absent, so [s, 1] == [s, 1, 0].
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, tag, speaker, clip]))


def speaker_name(index: int) -> str:
    return f"spk{index + 1:02d}"


def make_speaker(cfg: SynthConfig, index: int) -> Speaker:
    """Voice and appearance of speaker `index`; voices are spread evenly over 100-230 Hz.

    `cfg.speaker_spread` pulls every trait toward a middle speaker (the draws are the same, so a
    corpus at spread 1 is unchanged): at 0 all speakers share one face and voice."""
    rng = _rng(cfg, 0, index, 0)
    k = cfg.speaker_spread

    def toward(mid, drawn):
        return float(drawn) if k == 1 else float(mid + k * (drawn - mid))

    pos = (index + rng.uniform(0.2, 0.8)) / cfg.n_speakers  # in (0, 1), rising with the index
    hue = rng.uniform(0, 1, size=2)
    formant_noise = rng.normal(0, 0.02)
    rate, breath = rng.uniform(0.9, 1.1), rng.uniform(0.0, 0.06)
    scale, aspect = rng.uniform(0.88, 1.08), rng.uniform(0.93, 1.07)
    offset = (rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04))
    skin = rng.uniform(0.82, 1.12, size=3)
    hair = _HAIR[int(rng.integers(len(_HAIR)))]
    chin, eye_spread = rng.uniform(-3.0, 3.0), rng.uniform(-1.5, 1.5)
    pos = toward(0.5, pos)
    return Speaker(
        index=index, name=speaker_name(index), f0=float(100.0 * 2.3 ** pos),
        formant_scale=float(0.92 + 0.22 * pos + k * formant_noise),
        rate_scale=toward(1.0, rate), breath=toward(0.03, breath),
        mirror=bool(index % 2) and k >= 0.5, scale=toward(0.98, scale), aspect=toward(1.0, aspect),
        offset=(toward(0.0, offset[0]), toward(0.0, offset[1])),
        skin=tuple(toward(0.97, g) for g in skin),
        hair=tuple(toward(1.0, g) for g in hair),
        background=(_hue_rgb(hue[0], 0.35 * k, 0.85), _hue_rgb(hue[1], 0.5 * k, 0.45)),
        chin=toward(0.0, chin), eye_spread=toward(0.0, eye_spread),
    )


# Per-channel gains on the photo's light brown: dark brown, black, blonde, auburn, ash, as is.
_HAIR = ((0.55, 0.45, 0.4), (0.3, 0.28, 0.3), (1.15, 1.08, 0.85), (1.0, 0.62, 0.45), (0.85, 0.85, 0.9),
         (1.0, 1.0, 1.0))


def _hue_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    rgb = np.clip(np.abs((h * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return tuple(float(c) for c in 255 * v * (1 - s + s * rgb))
