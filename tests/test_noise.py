"""Noisy copies of a token store: exact SNR, reproducible noise, same clips and tokenizers, cache,
resume, and refusal of tokenizers that changed after the store was made."""

import csv
import shutil

import cv2
import numpy as np
import pytest
import torch
import zarr
from skimage.data import astronaut

import vqmae.noise as noise_mod
from tests.conftest import tone, write_video, write_wav
from vqmae.audio import peak_normalize, power_spectrogram
from vqmae.config import load_config
from vqmae.datasets import scan
from vqmae.ingest import ClipError, ingest, load_clip
from vqmae.media import read_audio
from vqmae.audio import NoiseSpec, add_noise, draw_noise
from vqmae.checkpoint import load_tokenizers
from vqmae.encoding import encode_corpus
from vqmae.noise import NoiseError, clips_from_store, noisy_store
from vqmae.store import TokenStore
from vqmae.stages.tokenize import fill_pools, train_one

FACE = cv2.resize(astronaut()[0:260, 110:330], (128, 128))
CFG = load_config("tiny", ["face.mode=haar", "audio_vq.steps=12", "visual_vq.steps=6",
                           "audio_vq.batch_frames=32", "visual_vq.batch_frames=4",
                           "audio_vq.warmup_steps=2", "visual_vq.warmup_steps=2",
                           "store.segment_clips=2", "audio.peak_normalize=true"])


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    x = clean.astype(np.float64)
    return 10 * np.log10(np.mean(x ** 2) / np.mean((noisy.astype(np.float64) - x) ** 2))


def voice(seconds: float, f0: float, seed: int) -> np.ndarray:
    """A voiced, vibrato, amplitude-modulated harmonic complex over a -40 dB noise floor: like a
    recording, every spectrogram bin holds some energy (a pure digital tone has bins 100 dB down,
    which any added noise dominates)."""
    t = np.arange(int(16000 * seconds)) / 16000
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    floor = 0.003 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * x / np.abs(x).max() + floor).astype(np.float32)


# -- one waveform --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["white", "pink"])
@pytest.mark.parametrize("snr", [-5.0, 0.0, 12.5, 40.0])
def test_snr_is_exact(kind, snr):
    x = voice(0.5, 150, 0)
    y = add_noise(x, NoiseSpec(snr, kind), "clip/a")
    assert y.dtype == np.float32 and y.shape == x.shape
    assert snr_db(x, y) == pytest.approx(snr, abs=1e-3)


def test_same_key_same_noise_other_key_other_noise():
    x = tone(0.5)
    spec = NoiseSpec(0.0, seed=3)
    a, b = add_noise(x, spec, "Actor_01/x"), add_noise(x, spec, "Actor_01/x")
    np.testing.assert_array_equal(a, b)
    other_clip = add_noise(x, spec, "Actor_01/y") - x
    other_seed = add_noise(x, NoiseSpec(0.0, seed=4), "Actor_01/x") - x
    for other in (other_clip, other_seed):
        assert abs(np.corrcoef(a - x, other)[0, 1]) < 0.05  # independent draws, not a shifted copy


def test_noise_draw_is_pinned():
    # the draw is a pure function of (seed, key) through blake2b: a change of hashing, generator or
    # shaping would silently change every noisy store, so a few values are pinned here
    np.testing.assert_allclose(draw_noise(4, NoiseSpec(0.0, seed=0), "a"),
                               [0.6337099134390776, 0.49174522786881975, -1.066056669279778,
                                -0.12555753962386243], rtol=1e-12)
    np.testing.assert_allclose(draw_noise(4, NoiseSpec(0.0, "pink", seed=7), "Actor_01/x"),
                               [2.547534588523272, 1.1524567480110588, -0.941273487871764,
                                -2.7587178486625668], rtol=1e-12)


def spectrum_slope(x: np.ndarray) -> float:
    """Slope of log10 power vs log10 frequency of a Welch-averaged periodogram, 30 Hz to 6 kHz."""
    seg = 1024
    frames = x[: len(x) // seg * seg].reshape(-1, seg) * np.hanning(seg)  # [K, seg]
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(0)  # [seg/2 + 1]
    f = np.fft.rfftfreq(seg, 1 / 16000)
    band = (f > 30) & (f < 6000)
    return float(np.polyfit(np.log10(f[band]), np.log10(power[band]), 1)[0])


def test_pink_spectrum_falls_as_one_over_f():
    x = np.zeros(1 << 16, np.float32)
    x[::50] = 1.0  # an impulse train: flat spectrum, so the noise's own shape is what is measured
    pink = add_noise(x, NoiseSpec(-40.0, "pink"), "k") - x
    white = add_noise(x, NoiseSpec(-40.0, "white"), "k") - x
    assert -1.2 < spectrum_slope(pink) < -0.8
    assert abs(spectrum_slope(white)) < 0.1
    assert abs(pink.mean()) < 1e-3 * pink.std()  # no DC


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="'quiet'.*silent"):
        add_noise(np.zeros(1600, np.float32), NoiseSpec(10.0), "quiet")
    with pytest.raises(ValueError, match="non-finite"):
        add_noise(np.array([0.5, np.nan], np.float32), NoiseSpec(10.0), "nan")
    with pytest.raises(ValueError, match="kind 'brown'"):
        NoiseSpec(10.0, "brown")


# -- through the decoder -------------------------------------------------------------------------

def test_load_clip_adds_noise_before_peak_normalisation(media_dir):
    path = write_wav(media_dir / "v.wav", voice(0.6, 140, 1))
    clip = scan(media_dir).clips[0]
    spec = NoiseSpec(5.0, "pink", seed=2)
    got = load_clip(clip, CFG, ("audio",), noise=spec).spec
    wave = add_noise(read_audio(str(path), 16000), spec, clip.clip_id)
    want = power_spectrogram(peak_normalize(torch.from_numpy(wave)), CFG.audio).numpy()
    np.testing.assert_array_equal(got, want[:len(got)])
    clean = load_clip(clip, CFG, ("audio",)).spec
    assert clean.shape == got.shape and not np.allclose(clean, got)
    # a spawned worker (its own hash seed) loads the very same noisy spectrogram
    (_, data, failure), = ingest([clip], CFG, ("audio",), workers=1, noise=spec)
    assert failure is None
    np.testing.assert_array_equal(data.spec, got)


def test_silent_clip_fails_naming_the_file(media_dir):
    write_wav(media_dir / "quiet.wav", np.zeros(8000, np.float32))
    with pytest.raises(ClipError, match="quiet.wav: audio: .*silent"):
        load_clip(scan(media_dir).clips[0], CFG, ("audio",), noise=NoiseSpec(0.0))


# -- whole stores --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A labelled store of two face videos (AAC tone) and two voice wavs, with tiny tokenizers."""
    tmp = tmp_path_factory.mktemp("noise")
    corpus = tmp / "corpus"
    corpus.mkdir()
    rows = []
    for i in range(2):
        write_video(corpus / f"v{i}.mp4", n_frames=20 + 5 * i, size=128,
                    frame_fn=lambda k, i=i: np.roll(FACE, ((k + i) % 7) - 3, axis=1))
        rows.append([f"v{i}.mp4", f"s{i}", ["happy", "sad"][i], "", 0.5 * i, "train"])
    for i in range(2):
        write_wav(corpus / f"a{i}.wav", voice(0.8 + 0.2 * i, 120 + 40 * i, i))
        rows.append([f"a{i}.wav", f"s{i}", "", "angry;sad", -0.25, ""])
    (corpus / "broken.mp4").write_bytes(b"\0" * 500)  # a failed row: not copied
    rows.append(["broken.mp4", "s9", "sad", "", "", "test"])
    with open(corpus / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "speaker", "label", "labels", "valence", "split"])
        w.writerows(rows)
    clips = scan(corpus / "manifest.csv").clips
    pools = fill_pools(clips, CFG, ("audio", "visual"), workers=0, seed=0,
                       capacity={"audio": 4000, "visual": 200})
    tok = tmp / "tokenizers"
    tok.mkdir()
    for m in ("audio", "visual"):
        train_one(m, getattr(pools, m), CFG, tok, device="cpu")
    store = tmp / "clean.zarr"
    encode_corpus(clips, CFG, store, load_tokenizers(tok, ("audio", "visual"), "cpu"), workers=0)
    return tmp, clips, store


@pytest.fixture(scope="module")
def noisy0(source):
    tmp, _, store = source
    return noisy_store(store, tmp / "snr0.zarr", NoiseSpec(0.0), cfg=CFG, workers=0)


def test_clips_from_store_rebuilds_the_scan(source):
    _, clips, store = source
    ok = [c for c in clips if "broken" not in c.path]
    assert clips_from_store(TokenStore.open(store)) == ok
    assert [c.has_video for c in ok] == [False, False, True, True]  # a*.wav sort before v*.mp4


def test_noisy_store_same_clips_and_specs_other_audio(source, noisy0):
    tmp, _, store = source
    clean, noisy = TokenStore.open(store), TokenStore.open(noisy0)
    ok = clean.clips["status"] == "ok"
    np.testing.assert_array_equal(noisy.clips["clip_id"], clean.clips["clip_id"][ok])
    assert (noisy.clips["status"] == "ok").all()
    assert noisy.specs == clean.specs  # same tokenizer sha256: a model of the clean store accepts it
    for col in ("audio_length", "visual_length", "label", "labels", "speaker", "split", "valence"):
        np.testing.assert_array_equal(noisy.clips[col], clean.clips[col][ok])
    np.testing.assert_array_equal(noisy.codes("visual"), clean.codes("visual"))
    assert (noisy.codes("audio") == clean.codes("audio")).mean() < 0.5
    assert noisy.attrs["noise"] == {"snr_db": 0.0, "kind": "white", "seed": 0,
                                    "source": str(store.resolve())}
    assert not (tmp / "snr0.zarr.noise.json").exists() and not (tmp / "snr0.zarr.parts").exists()


def test_high_snr_keeps_the_codes(source, noisy0):
    tmp, _, store = source
    clean = TokenStore.open(store)
    high = TokenStore.open(noisy_store(store, tmp / "snr60.zarr", NoiseSpec(60.0), cfg=CFG, workers=0))
    low = TokenStore.open(noisy0)
    same = {}
    for row, clip_id in enumerate(high.clips["clip_id"]):
        ref = clean.clip_codes("audio", int(np.flatnonzero(clean.clips["clip_id"] == clip_id)[0]))
        same[clip_id] = (high.clip_codes("audio", row) == ref).mean()
        assert same[clip_id] > (low.clip_codes("audio", row) == ref).mean()  # less noise, fewer changes
    assert same["a0"] >= 0.9 and same["a1"] >= 0.9, same  # recordings with a noise floor
    np.testing.assert_array_equal(high.codes("visual"), clean.codes("visual"))


def test_cache_returns_without_work(source, noisy0, monkeypatch):
    tmp, _, store = source
    stamp = (noisy0 / "zarr.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("re-encoded a cached store")

    monkeypatch.setattr(noise_mod, "encode_corpus", boom)
    monkeypatch.setattr(noise_mod, "store_tokenizers", boom)
    assert noisy_store(store, noisy0, NoiseSpec(0.0), cfg=CFG, workers=0) == noisy0
    assert (noisy0 / "zarr.json").stat().st_mtime_ns == stamp
    with pytest.raises(NoiseError, match=r"snr0.zarr: holds a noisy store for .*'snr_db': 0.0.*"
                                         r"wants .*'snr_db': 5.0"):
        noisy_store(store, noisy0, NoiseSpec(5.0), cfg=CFG, workers=0)


def test_refuses_to_write_into_another_store(source):
    tmp, _, store = source
    other = tmp / "other.zarr"
    shutil.copytree(store, other)
    with pytest.raises(NoiseError, match="other.zarr: holds a token store that is not a noisy store"):
        noisy_store(store, other, NoiseSpec(0.0), cfg=CFG, workers=0)


def test_interrupted_then_rerun_equals_uninterrupted(source, noisy0, monkeypatch):
    tmp, _, store = source
    out = tmp / "resumed.zarr"
    real = noise_mod.encode_corpus
    calls = []

    def interrupted(*a, **k):
        def stop():
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(*a, on_clip=stop, **k)

    monkeypatch.setattr(noise_mod, "encode_corpus", interrupted)
    with pytest.raises(KeyboardInterrupt):
        noisy_store(store, out, NoiseSpec(0.0), cfg=CFG, workers=0)
    assert not (out / "zarr.json").exists() and (tmp / "resumed.zarr.noise.json").exists()
    with pytest.raises(NoiseError, match="unfinished noisy store for .*'snr_db': 0.0"):
        noisy_store(store, out, NoiseSpec(10.0), cfg=CFG, workers=0)
    monkeypatch.setattr(noise_mod, "encode_corpus", real)
    resumed = TokenStore.open(noisy_store(store, out, NoiseSpec(0.0), cfg=CFG, workers=0))
    full = TokenStore.open(noisy0)
    np.testing.assert_array_equal(resumed.clips["clip_id"], full.clips["clip_id"])
    for m in ("audio", "visual"):
        np.testing.assert_array_equal(resumed.codes(m), full.codes(m))
    assert resumed.attrs["noise"] == full.attrs["noise"]


def test_changed_or_missing_tokenizer_is_refused(source, tmp_path):
    tmp, _, store = source
    moved = tmp_path / "clean.zarr"
    shutil.copytree(store, moved)
    group = zarr.open_group(str(moved), mode="r+")
    config = dict(group.attrs["config"])
    ckpt = tmp_path / "audio_vqvae.pt"
    shutil.copy(config["tokenizers"]["audio"]["path"], ckpt)
    sha = config["tokenizers"]["audio"]["sha256"]
    config["tokenizers"] = {**config["tokenizers"], "audio": {"path": str(ckpt), "sha256": sha}}
    group.attrs["config"] = config
    state = torch.load(ckpt, weights_only=True)
    state["step"] += 1  # retrained after the store was made
    torch.save(state, ckpt)
    out = tmp_path / "noisy.zarr"
    with pytest.raises(NoiseError, match=rf"{ckpt}: audio tokenizer sha256 [0-9a-f]{{64}} is not the one "
                                         rf".*clean.zarr was made with \({sha}\)"):
        noisy_store(moved, out, NoiseSpec(0.0), cfg=CFG, workers=0)
    ckpt.unlink()
    with pytest.raises(NoiseError, match=rf"its audio tokenizer {ckpt} \(sha256 {sha}\) does not exist"):
        noisy_store(moved, out, NoiseSpec(0.0), cfg=CFG, workers=0)
    assert not out.exists() and not (tmp_path / "noisy.zarr.noise.json").exists()
