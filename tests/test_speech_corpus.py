"""The second evaluation corpus: festival voices acting emotion through prosody, with noisy twins.
The generating tests need festival and praat-parselmouth (`make speech-corpus` installs both)."""

from __future__ import annotations

import csv
import importlib.util
import shutil

import numpy as np
import pytest
import torch

from vqmae.audio import power_spectrogram
from vqmae.config import AudioConfig
from vqmae.demo import speech
from vqmae.media import read_audio
from vqmae.prosody import estimate_f0, voiced

needs_tts = pytest.mark.skipif(shutil.which("text2wave") is None or importlib.util.find_spec("parselmouth") is None,
                               reason="festival / praat-parselmouth not installed (make speech-corpus)")


def test_speakers_are_seeded_and_spread_over_the_voices():
    a, b = speech.make_speakers(6, seed=3), speech.make_speakers(6, seed=3)
    assert a == b and a != speech.make_speakers(6, seed=4)
    assert [s.voice for s in a] == list(speech.VOICES) * 2
    assert len({round(s.pitch_median) for s in a}) == 6


def test_emotion_profiles_move_prosody_the_documented_way():
    e = {x.name: x for x in speech.EMOTIONS}
    assert e["neutral"].pitch == e["neutral"].range == e["neutral"].duration == 1.0
    assert e["happy"].pitch > 1 and e["happy"].range > 1 and e["happy"].duration < 1
    assert e["sad"].pitch < 1 and e["sad"].range < 1 and e["sad"].duration > 1 and e["sad"].gain_db < 0
    assert e["angry"].gain_db > 0 and e["angry"].tilt > 0 and e["angry"].arousal > 0 > e["angry"].valence


def test_pauses_are_commas_between_words():
    r = np.random.default_rng(0)
    assert speech._text("one two three four", 0.0, r) == "one two three four."
    assert speech._text("one two three four", 1.0, r) == "one, two, three, four."


@needs_tts
def test_corpus_is_deterministic_acted_and_has_noisy_twins(tmp_path):
    one = speech.synthesize_speech(tmp_path / "a", n_speakers=2, clips_per_speaker=4, workers=1)
    two = speech.synthesize_speech(tmp_path / "b", n_speakers=2, clips_per_speaker=4, workers=2)
    rows = list(csv.DictReader(open(one)))
    assert len(rows) == 8 and [r["label"] for r in rows[:4]] == ["neutral", "happy", "sad", "angry"]
    for r in rows:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()
        assert -1 <= float(r["valence"]) <= 1 and 0.25 <= float(r["intensity"]) <= 1
    assert one.read_bytes() == two.read_bytes()
    cfg = AudioConfig()
    f0 = {}
    for r in rows:
        x = read_audio(tmp_path / "a" / r["path"], 16000)
        assert 1.5 < len(x) / 16000 < 6
        p = power_spectrogram(torch.tensor(x), cfg).numpy()
        est, strength = estimate_f0(p, cfg)
        f0[(r["speaker"], r["label"])] = np.median(est[voiced(p, strength)])
        for snr in speech.NOISY_SNRS:  # the twin: the same clip plus noise at that SNR
            y = read_audio(tmp_path / f"a_snr{snr:g}" / r["path"], 16000)
            noise = y - x
            measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
            assert abs(measured - snr) < 0.5, (snr, measured)
    for s in ("sp00", "sp01"):  # acted: sad below neutral below happy in pitch
        assert f0[(s, "sad")] < f0[(s, "neutral")] < f0[(s, "happy")], f0
    with pytest.raises(speech.SpeechCorpusError, match="not empty"):
        speech.synthesize_speech(tmp_path / "a", n_speakers=2, clips_per_speaker=4)
