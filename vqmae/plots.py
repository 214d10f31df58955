"""PNG figures for run directories (matplotlib, Agg backend: no display needed).

Every function takes arrays and a path, writes the PNG atomically and returns the path.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vqmae.utils import atomic_write_bytes


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(*args, **kwargs)


def _save(plt, fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def spectrogram_rows(specs: list[np.ndarray], names: list[str], path: str | Path, title: str = "") -> Path:
    """Log-power spectrograms [T, F], one row each, on the colour scale of the first."""
    plt, fig, axes = _figure(len(specs), 1, figsize=(8, 2.5 * len(specs)), sharex=True, squeeze=False)
    lo = np.log10(specs[0] + 1e-8)
    vmin, vmax = np.percentile(lo, 1), lo.max()
    for ax, spec, name in zip(axes[:, 0], specs, names):
        ax.imshow(np.log10(spec.T + 1e-8), origin="lower", aspect="auto", vmin=vmin, vmax=vmax,
                  cmap="magma")
        ax.set_ylabel(f"{name}\nfrequency bin")
    axes[-1, 0].set_xlabel("frame (20 ms)")
    fig.suptitle(title)
    return _save(plt, fig, path)


def spectrogram_pair(original: np.ndarray, recon: np.ndarray, path: str | Path, title: str = "") -> Path:
    """An input spectrogram [T, F] above its reconstruction."""
    return spectrogram_rows([original, recon], ["input", "reconstruction"], path, title)


def image_rows(rows: list[np.ndarray], names: list[str], path: str | Path, title: str = "") -> Path:
    """Rows of RGB images uint8 [N, S, S, 3], each row labelled."""
    n = len(rows[0])
    plt, fig, axes = _figure(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (images, name) in enumerate(zip(rows, names)):
        for k in range(n):
            axes[r, k].imshow(images[k])
            axes[r, k].axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.suptitle(title)
    return _save(plt, fig, path)


def face_grid(original: np.ndarray, recon: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Face crops uint8 [N, S, S, 3]: inputs on the top row, reconstructions below."""
    return image_rows([original, recon], ["input", "reconstruction"], path, title)


def codebook_usage(counts: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Bar plot of code counts [codebook_size], sorted, with the used fraction in the title."""
    plt, fig, ax = _figure(figsize=(7, 3))
    ax.bar(np.arange(len(counts)), np.sort(counts)[::-1], width=1.0)
    ax.set_yscale("symlog")
    ax.set_xlabel("code (sorted by count)")
    ax.set_ylabel("frames")
    ax.set_title(f"{title} — {int((counts > 0).sum())}/{len(counts)} codes used")
    return _save(plt, fig, path)


def curves(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "",
           logy: bool = True) -> Path:
    """Line plot of named (step, value) series."""
    plt, fig, ax = _figure(figsize=(7, 3.5))
    for name, pts in series.items():
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(plt, fig, path)


def confusion_png(matrix: np.ndarray, classes: Sequence[str], path: str | Path, title: str) -> Path:
    """Confusion matrix int [C, C] (rows = true class): colours are row-normalised (per-class
    recall), each cell shows its count; an empty row stays blank rather than dividing by zero."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(classes):
        raise ValueError(f"{path}: confusion matrix of shape {matrix.shape} does not match "
                         f"{len(classes)} class names")
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)  # [C, C]
    n = len(classes)
    plt, fig, ax = _figure(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for r in range(n):
        for c in range(n):
            # White text on dark cells keeps every count readable.
            ax.text(c, r, str(int(matrix[r, c])), ha="center", va="center", fontsize=8,
                    color="white" if share[r, c] > 0.5 else "black")
    ax.set_xticks(range(n), list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(plt, fig, path)


def label_efficiency_png(curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                         path: str | Path, metric: str,
                         bounds: tuple[float, float] | None = (0.0, 1.0)) -> Path:
    """Metric against the share of labelled training data (log x, ticks at the measured shares in
    %), one line with ± std error bars per model: curves = {"pretrained": (fractions, means, stds),
    "scratch": (...)}. `bounds`: the metric's range; error bars stop there (None: unbounded)."""
    plt, fig, ax = _figure(figsize=(6, 4))
    ticks: set[float] = set()
    for name, (fractions, means, stds) in curves.items():
        if not len(fractions) == len(means) == len(stds):
            raise ValueError(f"{path}: curve {name!r} has {len(fractions)} fractions, {len(means)} "
                             f"means and {len(stds)} stds")
        m, sd = np.asarray(means, float), np.asarray(stds, float)
        lo, hi = (m - sd, m + sd) if bounds is None else (np.maximum(m - sd, bounds[0]),
                                                          np.minimum(m + sd, bounds[1]))
        ax.errorbar(fractions, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=name)
        ticks.update(float(f) for f in fractions)
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{100 * f:g}%" for f in sorted(ticks)])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    if bounds is not None:
        ax.set_ylim(bounds[0], bounds[1] + 0.02)
    ax.set_xlabel("labelled training clips (share of the fold's training set)")
    ax.set_ylabel(metric)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    ax.set_title(f"label efficiency: {metric}")
    return _save(plt, fig, path)
