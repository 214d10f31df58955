"""How hard is a `vqmae synth` corpus, speaker-independently? A yardstick that needs no tokens.

For every clip of the corpus a preset (plus `--set` overrides) describes, the voice is synthesised
(no video, no files) and seven clip-level prosodic features are measured: mean and spread of log F0
(autocorrelation pitch on 40 ms frames), voiced fraction, energy spread, spectral tilt of voiced
frames, syllable-like energy peaks per second and active-speech fraction. An L2 logistic regression
is then scored leave-one-speaker-out, on the raw features and on features z-scored per speaker
(speaker normalisation), and the unweighted average recall (UAR) printed with chance.

    python benchmarks/synth_prosody.py --preset tiny
    python benchmarks/synth_prosody.py --preset tiny --set synth.expressiveness=1 --set synth.n_speakers=4

It tells how far apart the emotions are in the voice alone relative to how far apart the speakers
are, which is what limits any speaker-independent model of the corpus (docs/model-quality.md,
"Earlier history").
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vqmae import demo as synth
from vqmae.config import load_config

FEATURES = ("log_f0_mean", "log_f0_std", "voiced", "energy_std", "tilt", "peaks_per_s", "active")


def clip_features(audio: np.ndarray, rate: int) -> np.ndarray:
    a = audio.astype(np.float64)
    a = a / (np.abs(a).max() + 1e-9)
    hop, win = rate // 50, rate // 25
    frames = np.lib.stride_tricks.sliding_window_view(a, win)[::hop]
    energy = np.log((frames ** 2).mean(1) + 1e-8)
    lo, hi = rate // 400, rate // 70  # 70-400 Hz
    f0 = np.full(len(frames), np.nan)
    for i, f in enumerate(frames):
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[win - 1:]
        k = lo + int(np.argmax(ac[lo:hi]))
        if ac[0] > 0 and ac[k] > 0.4 * ac[0]:
            f0[i] = rate / k
    voiced = np.isfinite(f0)
    log_f0 = np.log(f0[voiced])
    power = np.abs(np.fft.rfft(frames * np.hanning(win), axis=1)) ** 2
    freq = np.fft.rfftfreq(win, 1 / rate)
    tilt = np.log(power[:, freq > 2000].sum(1) + 1e-9) - np.log(power[:, (freq > 100) & (freq < 1000)].sum(1) + 1e-9)
    d = np.diff(energy)
    peaks = int(((d[:-1] > 0) & (d[1:] <= 0) & (energy[1:-1] > energy.max() - 3)).sum())
    return np.array([log_f0.mean() if voiced.any() else 0.0, log_f0.std() if voiced.sum() > 1 else 0.0,
                     voiced.mean(), energy.std(), tilt[voiced].mean() if voiced.any() else 0.0,
                     peaks / (len(a) / rate), (energy > energy.max() - 3).mean()])


def logistic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
             l2: float = 1e-2) -> np.ndarray:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-9
    xt = torch.tensor((x_train - mean) / std)
    xe = torch.tensor((x_test - mean) / std)
    w = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    y = torch.tensor(y_train)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (xe @ w + b).argmax(1).numpy()


def loso_uar(x: np.ndarray, y: np.ndarray, speaker: np.ndarray, n_classes: int) -> float:
    pred = np.zeros_like(y)
    for s in np.unique(speaker):
        test = speaker == s
        pred[test] = logistic(x[~test], y[~test], x[test], n_classes)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.preset, args.sets).synth
    t0 = time.perf_counter()
    specs = synth.plan(cfg)
    x = np.stack([clip_features(synth.make_clip(cfg, spec).audio, cfg.audio_rate) for spec in specs])
    y = np.array([cfg.emotions.index(spec.label) for spec in specs])
    speaker = np.array([spec.speaker for spec in specs])
    per_speaker = x.copy()
    for s in np.unique(speaker):
        rows = speaker == s
        per_speaker[rows] = (x[rows] - x[rows].mean(0)) / (x[rows].std(0) + 1e-9)
    n = len(cfg.emotions)
    print(f"{len(specs)} clips, {len(np.unique(speaker))} speakers, {n} emotions "
          f"(expressiveness {cfg.expressiveness}, speaker_spread {cfg.speaker_spread}); "
          f"{time.perf_counter() - t0:.1f} s to synthesise and measure")
    print(f"leave-one-speaker-out UAR of clip prosody (chance {1 / n:.3f}): raw "
          f"{loso_uar(x, y, speaker, n):.3f}, speaker-normalised {loso_uar(per_speaker, y, speaker, n):.3f}")
    print("per-emotion means (" + ", ".join(cfg.emotions) + ") and the spread of speaker means:")
    for j, name in enumerate(FEATURES):
        means = ", ".join(f"{x[y == c, j].mean():.3f}" for c in range(n))
        spread = np.std([x[speaker == s, j].mean() for s in np.unique(speaker)])
        print(f"  {name:12s} {means}   speakers ± {spread:.3f}")


if __name__ == "__main__":
    main()
