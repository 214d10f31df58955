"""How much a code's neighbours in time tell about it: a bound on what masked-token pretraining can learn.

For each modality of a token store, on the clips of held-out speakers (a fifth of the speakers,
drawn by ``--seed``):

- the per-position unigram accuracy: at each grid position, the code most frequent there in the
  other speakers' clips (what `vqmae pretrain` prints as its baseline);
- the accuracy of copying the code at the same grid position d frames earlier, for d = 1, 2, 5, 10.

A masked patch of the tiny preset spans 10 audio frames (5 video frames); its nearest visible
neighbour in time is 1 to 10 frames away. When copying a code from one frame earlier barely beats
the unigram, the codes change from frame to frame for reasons no context predicts, and masked-token
accuracy cannot rise far above the unigram however good the model is.

    python benchmarks/code_context.py runs/demo/data/tokens.zarr
"""

from __future__ import annotations

import argparse

import numpy as np

from vqmae.store import TokenStore

DISTANCES = (1, 2, 5, 10)


def context_table(store: TokenStore, name: str, seed: int = 0) -> dict[str, float]:
    """Unigram and copy-at-distance accuracies of modality ``name`` on held-out speakers' clips."""
    lengths, starts = store.clips[f"{name}_length"], store.clips[f"{name}_start"]
    speakers = np.array(store.clips["speaker"].tolist(), dtype=object)
    rows = np.flatnonzero(lengths > 0)
    names = np.unique(speakers[rows])
    held = set(np.random.default_rng(seed).choice(names, max(1, len(names) // 5), replace=False))
    codes = store.codes(name).reshape(store.n_frames(name), -1)  # [frames, positions]
    vocab = store.specs[name].codebook_size
    train = np.concatenate([np.arange(starts[r], starts[r] + lengths[r]) for r in rows if speakers[r] not in held])
    counts = np.zeros((codes.shape[1], vocab), np.int64)
    for g in range(codes.shape[1]):
        counts[g] = np.bincount(codes[train, g], minlength=vocab)
    top = counts.argmax(1)
    hits = {"unigram": [0, 0], **{f"copy t-{d}": [0, 0] for d in DISTANCES}}
    for r in rows:
        if speakers[r] not in held:
            continue
        c = codes[starts[r]:starts[r] + lengths[r]]
        hits["unigram"][0] += int((c == top).sum())
        hits["unigram"][1] += c.size
        for d in DISTANCES:
            if len(c) > d:
                hits[f"copy t-{d}"][0] += int((c[d:] == c[:-d]).sum())
                hits[f"copy t-{d}"][1] += c[d:].size
    return {k: h / n if n else float("nan") for k, (h, n) in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--seed", type=int, default=0, help="draws the held-out speakers")
    args = ap.parse_args()
    store = TokenStore.open(args.store, load=True)
    print(f"| modality | grid | {' | '.join(['unigram'] + [f'copy t-{d}' for d in DISTANCES])} |")
    print("|---" * (3 + len(DISTANCES)) + "|")
    for name, spec in store.specs.items():
        t = context_table(store, name, args.seed)
        print(f"| {name} | {'×'.join(map(str, spec.grid))} | " + " | ".join(f"{v:.3f}" for v in t.values()) + " |")


if __name__ == "__main__":
    main()
