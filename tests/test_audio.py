import pytest
import torch

from tests.conftest import tone
from vqmae.audio import (SilentAudioError, frames_for_samples, griffin_lim, inverse_power,
                         peak_normalize, power_spectrogram, samples_per_video_frame, stft_phase)
from vqmae.config import AudioConfig

CFG = AudioConfig()


def test_shapes_and_frame_rate():
    wave = torch.from_numpy(tone(2.0))
    spec = power_spectrogram(wave, CFG)
    assert spec.shape == (101, 513)  # center=True: N // hop + 1
    assert frames_for_samples(len(wave), CFG) == 100  # kept frames: 50 per second
    assert samples_per_video_frame(CFG, 25.0) == 640  # two hops per video frame
    assert power_spectrogram(wave.expand(3, -1), CFG).shape == (3, 101, 513)


def test_power_peaks_at_tone_bin():
    spec = power_spectrogram(torch.from_numpy(tone(1.0, freq=1000.0)), CFG)
    assert spec.mean(0).argmax().item() == round(1000 / (16000 / 1024))
    assert (spec >= 0).all()


def test_inverse_with_true_phase_is_exact():
    wave = torch.from_numpy(tone(1.0, freq=300.0)) * torch.linspace(0, 1, 16000)
    rebuilt = inverse_power(power_spectrogram(wave, CFG), stft_phase(wave, CFG), CFG, length=len(wave))
    assert torch.allclose(rebuilt, wave, atol=1e-4)


def test_griffin_lim_recovers_magnitude():
    wave = torch.from_numpy(tone(1.0, freq=300.0) + tone(1.0, freq=1200.0) * 0.5)
    power = power_spectrogram(wave, CFG)
    rebuilt = griffin_lim(power, CFG, n_iter=32, length=len(wave))
    err = (power_spectrogram(rebuilt, CFG).sqrt() - power.sqrt()).norm() / power.sqrt().norm()
    assert err < 0.15


def test_peak_normalize_and_silence():
    assert peak_normalize(torch.tensor([0.1, -0.25])).abs().max() == 1.0
    with pytest.raises(SilentAudioError, match="audio is silent"):
        peak_normalize(torch.zeros(1000))


def test_fps_must_divide_into_hops():
    with pytest.raises(ValueError, match="not divisible"):
        samples_per_video_frame(AudioConfig(hop_length=300), 25.0)


@pytest.mark.parametrize("n", [16000 * 3 + 123, 16000 * 3, 16000 * 3 + 1])
def test_long_waves_are_transformed_in_chunks_exactly(monkeypatch, n):
    """Past STFT_CHUNK_FRAMES frames the power spectrogram is computed chunk by chunk; it equals the
    one-shot transform bit for bit (edges included: the reflect padding is the same)."""
    import vqmae.audio as A
    from vqmae.config import AudioConfig

    cfg = AudioConfig()
    wave = torch.randn(2, n, generator=torch.Generator().manual_seed(0)) * 0.1
    whole = A.power_spectrogram(wave, cfg)
    monkeypatch.setattr(A, "STFT_CHUNK_FRAMES", 7)
    chunked = A.power_spectrogram(wave, cfg)
    assert chunked.shape == whole.shape == (2, n // cfg.hop_length + 1, cfg.n_fft // 2 + 1)
    assert torch.equal(chunked, whole)
