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
