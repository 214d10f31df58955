"""Models shared the way the field shares them: a Hugging Face Hub-ready folder.

    write_hub_folder(classifier.pt, DIR)   (`vqmae export CLASSIFIER.pt --hub-dir DIR`)
        DIR/model.safetensors             the classifier's weights
        DIR/audio_tokenizer.safetensors   the tokenizers that made its inputs (encoder and decoder)
        DIR/visual_tokenizer.safetensors
        DIR/config.json                   everything needed to rebuild them, sha256 of every file
        DIR/README.md                     the model card: intended use, training data, provenance,
                                          metrics, evaluation protocol, how to load it

    load_hub_folder(DIR or "user/repo")    (`Predictor.from_pretrained`) → the rebuilt parts

Weights are safetensors (no pickled code runs at load); configs are JSON. A folder is uploaded with
the user's own ``huggingface-cli upload user/repo DIR``; a repo id is fetched with
``huggingface_hub.snapshot_download`` (cached; offline use with ``HF_HUB_OFFLINE=1``). Loading
checks every file against the sha256 in `config.json`, and rebuilds the tokenizers and classifier
exactly as `vqmae predict` does from the `.pt` checkpoints (same configs, same checks), so both give
the same scores. Needs the ``hub`` extra (`pip install 'vqmae[hub]'`: safetensors, huggingface_hub).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from dataclasses import dataclass

from vqmae import __version__
from vqmae.checkpoint import (CheckpointError, LoadedTokenizer, build_classifier, check_tokenizers_fit,
                              checkpoint_sha256, load_classifier)
from vqmae.config import Config, ConfigError, set_key
from vqmae.encoding import feature_config
from vqmae.models.classifier import EmotionModel
from vqmae.models.tokenizers import build_tokenizer
from vqmae.stages.predict.results import PredictError
from vqmae.tasks import Task
from vqmae.utils import atomic_write_bytes, atomic_write_json, jsonable

FORMAT = "vqmae-hub/1"
CONFIG = "config.json"
MODEL = "model.safetensors"
CARD = "README.md"
EXTRA = "pip install 'vqmae[hub]'"


@dataclass
class HubModel:
    """What a Hub folder rebuilds: `Predictor(model, task, tokenizers, cfg, window_seconds, ...)`."""

    model: EmotionModel
    task: Task
    tokenizers: dict[str, LoadedTokenizer]
    cfg: Config
    window_seconds: float
    folder: Path


def tokenizer_file(modality: str) -> str:
    return f"{modality}_tokenizer.safetensors"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise PredictError(f"Hub folders need the safetensors package ({EXTRA})") from None
    return safetensors.torch


def write_hub_folder(classifier_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                     tokenizers: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the Hub folder of the classifier at `classifier_path` into `out_dir` (created; files of
    the same names replaced, each atomically, `config.json` last). `tokenizers` as for `vqmae predict`.
    Returns {file name: path}. Raises PredictError naming the file and the reason."""
    st = _safetensors()
    path, out = Path(classifier_path), Path(out_dir)
    try:
        loaded = load_classifier(path, tokenizers=tokenizers)
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    ckpt = loaded.ckpt
    if out.exists() and not out.is_dir():
        raise PredictError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).unlink(missing_ok=True)  # a half-replaced folder is never described as whole
    blobs = {MODEL: st.save({k: v.contiguous() for k, v in ckpt["state_dict"].items()})}
    toks = {}
    for m, t in loaded.tokenizers.items():
        blobs[tokenizer_file(m)] = st.save({k: v.contiguous() for k, v in t.model.state_dict().items()})
        toks[m] = {"kind": t.ckpt["kind"], "config": t.ckpt["config"], "file": tokenizer_file(m),
                   "checkpoint_sha256": t.sha256}
    extra = {k: v for k, v in ckpt["extra"].items() if k not in ("tokenizers", "best_state")}
    config = {
        "format": FORMAT, "vqmae_version": __version__, "library_name": "vqmae",
        "classifier": {"config": ckpt["config"], "extra": extra, "parents": ckpt.get("parents") or {},
                       "metrics": ckpt.get("metrics") or {}, "checkpoint_sha256": checkpoint_sha256(path)},
        "tokenizers": toks,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
    }
    config = jsonable(config)
    for name, data in blobs.items():
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / CARD, model_card(config, loaded.model, loaded.task).encode())
    atomic_write_json(out / CONFIG, config)
    return {name: out / name for name in (*blobs, CARD, CONFIG)}


def load_hub_folder(name_or_path: str | os.PathLike, *, device: str = "cpu", revision: str | None = None,
                    face_mode: str | None = None) -> HubModel:
    """The classifier and tokenizers of a folder written by `write_hub_folder`, or of a Hub repo id
    holding one (downloaded through huggingface_hub). Raises PredictError naming the file and the
    reason."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        folder = _download(str(name_or_path), revision)
    st = _safetensors()
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise PredictError(f"{folder}: no {CONFIG}; not a vqmae Hub folder (vqmae export --hub-dir)") from None
    except (OSError, ValueError) as e:
        raise PredictError(f"{folder / CONFIG}: unreadable ({e})") from None
    if config.get("format") != FORMAT:
        raise PredictError(f"{folder / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
    for name, want in config["files"].items():
        try:
            got = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        except OSError as e:
            raise PredictError(f"{folder / name}: unreadable ({e.strerror or e})") from None
        if got != want:
            raise PredictError(f"{folder / name}: sha256 {got[:12]}… is not the {want[:12]}… that "
                               f"{CONFIG} records; the file is damaged or was replaced")
    clf = config["classifier"]
    try:
        model, task, cfg, mae_cfg, dims = build_classifier(clf, st.load_file(str(folder / MODEL)), folder / MODEL)
        toks = {m: _tokenizer(folder, t, st, device) for m, t in config["tokenizers"].items()}
        check_tokenizers_fit(folder, dims, mae_cfg, toks)
        cfg = feature_config(cfg, toks)
        if face_mode is not None:
            cfg = set_key(cfg, "face.mode", face_mode)
    except (CheckpointError, ConfigError) as e:
        raise PredictError(str(e)) from None
    return HubModel(model.to(device).eval(), task, toks, cfg, mae_cfg.window_seconds, folder)


def _tokenizer(folder: Path, info: Mapping[str, Any], st: Any, device: str) -> LoadedTokenizer:
    path = folder / info["file"]
    try:
        model = build_tokenizer(info["kind"], Config.from_dict(info["config"]))
        model.load_state_dict(st.load_file(str(path)))
    except (KeyError, ValueError, RuntimeError, ConfigError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the {info.get('kind')} tokenizer: {e}") from None
    ckpt = {"kind": info["kind"], "config": info["config"]}
    return LoadedTokenizer(model.to(device).eval(), ckpt, str(info["checkpoint_sha256"]), path)


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PredictError(f"{repo_id}: not a folder, and loading a Hub repo id needs the huggingface_hub "
                           f"package ({EXTRA})") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one clear line
        raise PredictError(f"{repo_id}: not a folder, and the Hub download failed: {type(e).__name__}: {e}") from None


def model_card(config: Mapping[str, Any], model: EmotionModel, task: Task) -> str:
    """The folder's README.md: Hub metadata, then what the model is for and how it was made."""
    clf, extra = config["classifier"], config["classifier"]["extra"]
    cfg, names, kind = clf["config"], list(task.names), task.kind
    modalities = list(model.names)
    metrics = clf["metrics"]
    rows = "\n".join(f"| {mode} | {metrics.get(f'{mode}/uar', float('nan')):.3f} | "
                     f"{metrics.get(f'{mode}/war', float('nan')):.3f} | "
                     f"{metrics.get(f'{mode}/macro_f1', float('nan')):.3f} | "
                     f"{int(metrics.get(f'{mode}/n_clips', 0))} |"
                     for mode in ("av", "audio", "visual") if f"{mode}/uar" in metrics)
    parents = "\n".join(f"- {k}: `{v}`" for k, v in clf["parents"].items())
    ft = cfg.get("finetune", {})
    norm = ("on (a test speaker's mean from its own unlabelled clips; a lone clip uses the training "
            "speakers' mean)") if model.speaker_norm else "off"
    return f"""---
library_name: vqmae
tags: [speech-emotion-recognition, audio-classification, video-classification, vqmae]
---

# vqmae emotion classifier ({', '.join(modalities)}: {', '.join(names)})

A {kind} model made by `vqmae finetune` (vqmae {config['vqmae_version']}):
discrete audio{' and face' if 'visual' in modalities else ''} tokens from the two VQ-VAE tokenizers in
this folder, a masked-token transformer encoder ({extra.get('variant', '?')} initialisation), clips
scored whole in {extra['mae_config']['window_seconds']:g} s windows pooled into one clip vector.

## Intended use and limits

Research on speech emotion recognition: scoring the emotion {'classes' if kind != 'regress' else 'values'}
{', '.join(names)} of talking-face video or speech audio like the training data. Not for decisions
about people: emotion expressed in a recording is not the emotion felt, acted corpora differ from
natural speech, and scores on other languages, recording conditions or populations than the
training data's are unknown until measured.

## Training data and protocol

- Token store: `{extra.get('store', '?')}` (preset `{cfg.get('preset')}`, seed {cfg.get('seed')}).
- Speaker-independent {ft.get('protocol', '?')} protocol: this is fold `{extra.get('fold', '?')}` with
  {100 * float(extra.get('fraction', 1.0)):g}% of the training labels; test speakers
  {', '.join(map(str, extra.get('test_speakers', [])))}; validation speakers
  {', '.join(map(str, extra.get('val_speakers', [])))} chose the epoch (the test fold chose nothing).
- Speaker normalisation: {norm}.

## Metrics on this fold's test speakers

| evaluated modalities | UAR | WAR | macro-F1 | clips |
|---|---|---|---|---|
{rows}

## Provenance (sha256)

- classifier checkpoint: `{clf['checkpoint_sha256']}`
{parents}

## How to use

```python
from vqmae import Predictor
pred = Predictor.from_pretrained("path/or/user-repo")   # this folder, or its Hub repo id
print(pred.predict("clip.mp4").scores)
```

or `vqmae predict clip.mp4 --model path/to/this/folder`.
"""
