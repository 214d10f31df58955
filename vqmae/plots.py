"""PNG figures for run directories (matplotlib, Agg backend: no display needed).

Every function takes arrays and a path, writes the PNG atomically and returns the path.
"""

from __future__ import annotations

import io
from pathlib import Path

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


def spectrogram_pair(original: np.ndarray, recon: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Log-power spectrograms [T, F] of an input and its reconstruction, one above the other."""
    plt, fig, axes = _figure(2, 1, figsize=(8, 5), sharex=True)
    lo = np.log10(original + 1e-8)
    vmin, vmax = np.percentile(lo, 1), lo.max()
    for ax, spec, name in zip(axes, (original, recon), ("input", "reconstruction")):
        ax.imshow(np.log10(spec.T + 1e-8), origin="lower", aspect="auto", vmin=vmin, vmax=vmax,
                  cmap="magma")
        ax.set_ylabel(f"{name}\nfrequency bin")
    axes[-1].set_xlabel("frame (20 ms)")
    fig.suptitle(title)
    return _save(plt, fig, path)


def face_grid(original: np.ndarray, recon: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Face crops uint8 [N, S, S, 3]: inputs on the top row, reconstructions below."""
    n = len(original)
    plt, fig, axes = _figure(2, n, figsize=(1.3 * n, 2.8), squeeze=False)
    for k in range(n):
        for row, img in enumerate((original[k], recon[k])):
            axes[row, k].imshow(img)
            axes[row, k].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.suptitle(title)
    return _save(plt, fig, path)


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
