"""vqmae: self-supervised audiovisual speech emotion recognition with discrete tokens.

    import vqmae
    p = vqmae.Predictor.load("classifier.pt"); p.predict("clip.mp4").top
    store = vqmae.TokenStore.open("tokens.zarr"); ckpt = vqmae.load_checkpoint("mae.pt")

The names below are imported on first use, so `import vqmae` stays light. The stage functions live
in their modules (`vqmae.stages.pretrain.pretrain`, `vqmae.stages.finetune.finetune`), whose names they share.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Predictor": "vqmae.stages.predict", "Prediction": "vqmae.stages.predict",
    "TokenStore": "vqmae.store", "load_checkpoint": "vqmae.checkpoint",
    "load_config": "vqmae.config", "Config": "vqmae.config",
    "load_tokenizers": "vqmae.checkpoint", "scan": "vqmae.datasets",
    "EmotionModel": "vqmae.models.classifier", "MAEModel": "vqmae.models.mae",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vqmae' has no attribute {name!r}")
