"""Configuration: one frozen dataclass per concern, grouped in `Config`.

Presets (`tiny` for CPU tests, `paper` for docs/design.md §2) build a `Config`; `--set key=value`
overrides are parsed against the dataclass field types, so `--set audio.n_fft=abc` or an unknown key
fails before any work starts. The resolved config is stored as a plain dict in every artifact and
models are rebuilt from that dict (`Config.from_dict`), never from the current command line.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A bad preset name, unknown key or badly typed override."""


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 320  # 16000 / 320 = 50 spectrogram frames per second
    peak_normalize: bool = True
    griffin_lim_iters: int = 32

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length


@dataclass(frozen=True)
class VideoConfig:
    fps: float = 25.0
    # Frames decoded per batch when streaming a long file: bounds memory independently of its length.
    chunk_frames: int = 128
    # Longest side of frames handed to the face detector (decode-time resize keeps detection cheap).
    max_side: int = 640
    clip_timeout_s: float = 600.0  # a clip this long without progress fails (0: none); ×size/200 MB above


@dataclass(frozen=True)
class FaceConfig:
    mode: Literal["auto", "fan", "haar", "none"] = "auto"
    size: int = 96
    # Crop side relative to the detected box side (haar boxes are tight around eyes and mouth).
    box_scale: float = 1.4
    # Detection runs on every `detect_every`-th frame; boxes in between are interpolated.
    detect_every: int = 1
    # Half-width (frames) of the moving median/mean used to smooth box tracks.
    smooth_frames: int = 2
    # Smallest face side / frame's shorter side (talking faces: 0.35-0.45). 0.2: haar scans 284×160
    # of a 640×360 frame; 0.1: 569×320, 4× slower, and it found a false face on a suit.
    min_face_frac: float = 0.2
    fan_device: str = "auto"  # "auto": cuda, else mps, else cpu
    fan_detector: Literal["haar", "sfd", "blazeface"] = "haar"


@dataclass(frozen=True)
class AudioVQConfig:
    """Audio VQ-VAE: one power-spectrogram frame [513] → [n_tokens] codes (docs/design.md §2)."""

    n_tokens: int = 64
    codebook_size: int = 256
    code_dim: int = 8
    channels: int = 64
    n_res_blocks: int = 2
    commitment: float = 0.25
    ema_decay: float = 0.99
    # A code whose EMA count of assigned vectors per batch drops below this is restarted.
    dead_threshold: float = 1.0
    # training
    steps: int = 20000
    batch_frames: int = 512
    lr: float = 1e-3
    warmup_steps: int = 500
    max_train_clips: int = 0  # 0 = every clip of the corpus
    # Training frames kept in RAM: a uniform sample of every frame decoded (200k ≈ 67 min, 410 MB).
    pool_frames: int = 200_000
    # Append 4 prosody ids per frame (F0, energy, harmonicity, tilt: vqmae/models/prosody_ids.py).
    prosody_ids: bool = False  # on in the tiny preset, with audio.peak_normalize=false (docs/model-quality.md)


@dataclass(frozen=True)
class VisualVQConfig:
    """Visual VQ-VAE: one RGB face crop [3, 96, 96] → [24, 24] codes (docs/design.md §2)."""

    codebook_size: int = 512
    code_dim: int = 4
    channels: int = 128
    n_res_blocks: int = 2
    commitment: float = 0.25
    ema_decay: float = 0.99
    dead_threshold: float = 1.0  # as AudioVQConfig.dead_threshold
    # training
    steps: int = 20000
    batch_frames: int = 128
    lr: float = 1e-3
    warmup_steps: int = 500
    max_train_clips: int = 0
    pool_frames: int = 50_000  # uint8 crops: 50k × 27.6 kB ≈ 1.4 GB


@dataclass(frozen=True)
class MAEConfig:
    """Masked-token transformer over audio + visual codes (docs/design.md §2, VQ-MAE-AV)."""

    # "auto": what the token store holds (av with audio and visual codes, else its one modality);
    # stages write the resolved value into their artifacts
    modalities: Literal["auto", "av", "audio", "visual"] = "auto"
    window_seconds: float = 2.0  # 50 video frames + 100 audio frames at the default rates
    visual_tube: tuple[int, ...] = (4, 4, 5)  # tokens (height, width) × frames per visual patch
    audio_patch: tuple[int, ...] = (4, 10)  # frequency tokens × frames per audio patch
    visual_embed_dim: int = 4  # per-id embedding; 4 × 80 ids = 320 per tube
    audio_embed_dim: int = 8  # 8 × 40 ids = 320 per patch
    width: int = 320
    heads: int = 4
    mlp_ratio: float = 2.0
    # Position embeddings (learned either way) start at "sincos": a fixed-frequency code of each
    # patch's (time, grid row, grid column), the time part shared by both modalities, so attention
    # can find a patch's neighbours from the first step (facebookresearch/mae uses fixed sin-cos);
    # or at "random" (trunc-normal, std 0.02).
    pos_init: Literal["sincos", "random"] = "sincos"
    encoder_depth: int = 6
    decoder_depth: int = 3
    dropout: float = 0.0
    fusion: Literal["joint", "cross"] = "joint"
    # masking (vqmae/models/masking.py); "coupled_batch": one ratio per batch, as the paper
    masking: Literal["coupled", "coupled_batch", "fixed", "time", "audio2visual",
                     "visual2audio"] = "coupled_batch"
    mask_ratio_audio: float = 0.5  # for "fixed" and "time"
    mask_ratio_visual: float = 0.5
    contrastive_weight: float = 0.0
    # Prediction head (vqmae/models/heads.py): -1 = the paper's, the width read as one slice per id
    # and a shared Linear(slice → codebook_size); 0 = one linear layer to ids × codebook_size
    # (16.4 M params at paper sizes); d > 0 = width → ids × d, then a shared d → codebook_size.
    head_dim: int = -1
    # Add each grid cell's code log-frequencies over the training clips to the logits (a buffer set
    # by `vqmae pretrain`). Off: on a tiny store it lowered the validation CE but not the fine-tuned
    # UAR, and costs a logits-sized gather per step (benchmarks/pretrain.py --variant ...=true).
    unigram_prior: bool = False


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 100_000
    batch_size: int = 256
    base_lr: float = 1e-3  # lr = base_lr × batch_size / 256
    warmup_steps: int = 2_000
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.95)
    grad_clip: float = 1.0
    val_fraction: float = 0.05  # clips held out for validation loss / accuracy
    val_every: int = 1_000
    ckpt_every: int = 1_000
    log_every: int = 20
    recon_every: int = 5_000
    compile: bool = False  # torch.compile each transformer block (MAEModel.compile_blocks)
    workers: int = 4  # DataLoader workers for stores that do not fit in RAM
    ram_limit_gb: float = 8.0  # stores with fewer code bytes than this are loaded into RAM
    # Streaming path (stores over ram_limit_gb): codes read per shuffle group, per worker.
    stream_buffer_mb: float = 256.0


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3: emotion models on the pretrained encoder, speaker-independent evaluation (docs/design.md §6)."""

    task: str = "classify"  # a kind in vqmae.tasks.TASKS: classify, multilabel, regress
    targets: tuple[str, ...] = ("valence", "arousal", "dominance")  # regress: table columns
    pooling: Literal["attention", "mean", "cls", "stats", "position"] = "position"  # per modality, window
    # A clip's window vectors pooled into one before the head ("attention": a learned query over
    # the windows; "mean"); training samples are crops of at most clip_windows windows.
    clip_pooling: Literal["attention", "mean"] = "attention"
    clip_windows: int = 4
    # the head's LayerNorm (vqmae.models.classifier.HEAD_NORMS): none, or before / after centering
    head_norm: Literal["centered", "pooled", "none"] = "none"
    # The head's linear layer at the start: "random", or "fit" to convergence on the initial
    # encoder's clip vectors (as the `probe` variant), then fine-tuned with it (LP-FT, Kumar et al.
    # 2022). All labels (docs/model-quality.md): speech 0.617 vs 0.550 UAR for "random" with the
    # "centered" norm; demo AV 0.912 vs 0.845.
    head_init: Literal["random", "fit"] = "fit"
    # patch dropout: the fraction of a training window's patches hidden from the encoder, at random
    patch_dropout: float = 0.0
    freeze: bool = False  # linear probe: the encoder stays as pretrained (or as initialised)
    # what to train: "pretrained" (from the MAE) and "scratch" (identical backbone, random init), and
    # "probe" (the pretrained encoder frozen, a linear head fitted to convergence on its
    # speaker-centred clip vectors), and the linear baselines on the same folds
    # (vqmae.stages.finetune.baseline; probe and baselines: classify and regress only, skipped
    # with a warning for other tasks): "tokens", per-position code histograms (grid positions pooled
    # in blocks of token_pool), centred per speaker with speaker_norm; "egemaps", openSMILE's
    # eGeMAPSv02 functionals of the clip's audio, z-scored per speaker
    inits: tuple[str, ...] = ("pretrained", "probe", "scratch", "tokens", "egemaps")
    token_pool: int = 4
    protocol: Literal["kfold", "loso", "split"] = "kfold"
    folds: int = 5
    val_speakers: int = 1  # carved from each fold's training speakers; selects the epoch
    label_fractions: tuple[float, ...] = (1.0,)  # of each fold's training clips, stratified, nested
    eval_modalities: tuple[str, ...] = ("av", "audio", "visual")  # scored at test time
    # During training each sample loses one of its two modalities with this probability, so one
    # audiovisual model can be evaluated (and deployed) on audio or video alone.
    modality_dropout: float = 0.3
    # Subtract each speaker's mean pooled features before the head (vqmae/classifier.py): training
    # speakers' means are recomputed each epoch, a test speaker's come from its own unlabelled
    # clips; `vqmae predict --same-speaker` does the same for a set of one speaker's files.
    speaker_norm: bool = True
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4  # encoder
    head_lr: float = 1e-3  # pooling + head (randomly initialised in every run)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    dropout: float = 0.1  # before the head
    class_weights: bool = False  # classify: weight CE by inverse training-class frequency
    eval_batch: int = 64
    # noise robustness: test clips re-tokenized with noise at these SNRs (dB), added to the waveform
    noise_snrs: tuple[float, ...] = ()
    noise_kind: Literal["white", "pink"] = "white"
    # cross-modal distillation: an AV teacher → audio-only student (see vqmae/finetune.py)
    distill: bool = False
    distill_temperature: float = 2.0
    distill_weight: float = 0.5  # upper bound of a clip's distillation weight (times its reliability)


@dataclass(frozen=True)
class SynthConfig:
    n_speakers: int = 6
    clips_per_speaker: int = 48
    audio_only_per_speaker: int = 8
    emotions: tuple[str, ...] = ("neutral", "happy", "sad", "angry")
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    frame_size: int = 160
    audio_rate: int = 16000
    seed: int = 0
    # Per-clip spread (intensity, pitch, rate, level, VAD jitter): 0 = every clip its class prototype.
    variability: float = 1.0
    # Gain on how far each emotion moves voice and face away from neutral (1 = the profiles as
    # written). Labels (valence / arousal / dominance) are not scaled: only the signal is.
    expressiveness: float = 1.0
    # How different the speakers look and sound, 0 (one face and voice) to 1 (pitch over
    # 100-230 Hz, skin, hair and backdrop colours, face shape and placement, mirrored faces).
    speaker_spread: float = 1.0


@dataclass(frozen=True)
class StoreConfig:
    # Clips per part segment: one segment is written, then renamed into place in one step.
    segment_clips: int = 32
    audio_chunk_rows: int = 4096
    visual_chunk_rows: int = 512


@dataclass(frozen=True)
class Config:
    preset: str = "paper"
    seed: int = 0
    device: str = "auto"
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    audio_vq: AudioVQConfig = field(default_factory=AudioVQConfig)
    visual_vq: VisualVQConfig = field(default_factory=VisualVQConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Rebuild from a stored dict; keys this version does not know are an error."""
        return _from_dict(cls, data, prefix="")


# What each stage's artifacts depend on. A run resumes only under a config that agrees on its stage's
# view, and nothing else is compared: a tokenizer run resumed with another finetune.* is fine.
# (Both tokenizers share one view: clips whose faces are not found drop out of the audio pool too.)
VIEWS: dict[str, tuple[str, ...]] = {
    "tokenize": ("seed", "audio", "video", "face", "audio_vq", "visual_vq"),
    "pretrain": ("seed", "mae", "pretrain"),
    "finetune": ("seed", "mae", "finetune"),
}


def config_view(cfg: Config, stage: str) -> dict[str, Any]:
    """The sections of `cfg` that stage `stage` depends on, as a plain dict."""
    full = cfg.to_dict()
    return {k: full[k] for k in VIEWS[stage]}


def view_differences(stored: Config, cfg: Config, stage: str) -> list[str]:
    """Dotted keys of `stage`'s view whose values differ, as "key: stored → now" strings."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        elif a != b:
            out.append(f"{key}: {a!r} → {b!r}")

    walk(config_view(stored, stage), config_view(cfg, stage), "")
    return out


def section_from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """One config section (e.g. `MAEConfig`) from its stored dict; `prefix` names it in errors."""
    return _from_dict(cls, data, prefix)


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {[prefix + k for k in unknown]}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(tp, value, prefix + name)
    return cls(**kwargs)


def _tiny() -> Config:
    return Config(
        preset="tiny",
        video=VideoConfig(chunk_frames=64),
        # loudness kept, prosody ids (docs/model-quality.md); docs/results.md, "What the audio codes keep"
        audio=AudioConfig(peak_normalize=False),
        audio_vq=AudioVQConfig(channels=32, n_res_blocks=1, steps=1500, batch_frames=128, lr=2e-3,
                               dead_threshold=2.0, warmup_steps=30, prosody_ids=True),
        visual_vq=VisualVQConfig(channels=32, n_res_blocks=1, steps=300, batch_frames=32,
                                 warmup_steps=30),
        # fixed 50% masking, sin-cos positions (docs/commands.md, pretrain); the paper's 2 s windows; a 150-step
        # warm-up (40 let some seeds settle on the unigram: docs/model-quality.md)
        mae=MAEConfig(width=64, heads=2, encoder_depth=2, decoder_depth=1, head_dim=16,
                      window_seconds=2.0, masking="fixed"),
        pretrain=PretrainConfig(steps=500, batch_size=16, base_lr=0.128, warmup_steps=150,
                                val_fraction=0.1, val_every=100, ckpt_every=100, log_every=10,
                                recon_every=250, workers=0),
        # The demo corpus: 12 speakers × 8 clips acted at strong intensity (expressiveness 3); with
        # 4 speakers, or the written profiles, nothing transferred to a new speaker
        # (docs/model-quality.md, "Earlier history").
        finetune=FinetuneConfig(folds=4, epochs=12, batch_size=16, lr=1e-3, head_lr=3e-3,
                                eval_batch=128),
        synth=SynthConfig(n_speakers=12, clips_per_speaker=8, audio_only_per_speaker=2,
                          min_seconds=1.0, max_seconds=2.0, frame_size=128, expressiveness=3.0),
        store=StoreConfig(segment_clips=4, audio_chunk_rows=512, visual_chunk_rows=128),
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {"paper": Config, "tiny": _tiny}


def valid_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key `--set` accepts."""
    cfg = cfg or Config()
    out = []

    def walk(obj: Any, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                out.append(prefix + f.name)

    walk(cfg, "")
    return out


def mae_modalities(mode: str, available: typing.Iterable[str]) -> str:
    """`mae.modalities` made concrete: "auto" → "av" when audio and visual codes are both
    `available`, else the one that is; any other mode is returned as it is (the model and the
    window geometry check it against the store)."""
    if mode != "auto":
        return mode
    have = {"audio", "visual"} & set(available)
    if not have:
        raise ConfigError(f"mae.modalities='auto': no audio or visual codes among {sorted(available)}")
    return "av" if len(have) == 2 else have.pop()


def resolve_modalities(cfg: Config, available: typing.Iterable[str]) -> Config:
    """`cfg` with `mae.modalities` made concrete for a store holding `available` modalities."""
    mode = mae_modalities(cfg.mae.modalities, available)
    return cfg if mode == cfg.mae.modalities else replace(cfg, mae=replace(cfg.mae, modalities=mode))


def load_config(preset: str = "paper", overrides: typing.Sequence[str] = ()) -> Config:
    """Build a preset and apply `key=value` overrides (dotted keys, values checked against types)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        cfg = set_key(cfg, key.strip(), raw.strip())
    return cfg


def set_key(cfg: Any, key: str, raw: str, _prefix: str = "") -> Any:
    """Return a copy of `cfg` with dotted `key` set to the string `raw` parsed to the field's type."""
    head, _, rest = key.partition(".")
    full = _prefix + key
    names = {f.name for f in fields(cfg)}
    if head not in names:
        raise ConfigError(_unknown(full))
    hints = typing.get_type_hints(type(cfg))
    current = getattr(cfg, head)
    if is_dataclass(current):
        if not rest:
            raise ConfigError(f"{full!r} is a section; set one of its fields, e.g. {full}.<field>=...")
        return replace(cfg, **{head: set_key(current, rest, raw, _prefix + head + ".")})
    if rest:
        raise ConfigError(_unknown(full))
    return replace(cfg, **{head: _parse(hints[head], raw, full)})


def _unknown(key: str) -> str:
    """An unknown key's message: the closest valid keys (else its section's keys), not all of them."""
    import difflib

    keys, section = valid_keys(), key.partition(".")[0] + "."
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(map(repr, close))}?" if close else "valid keys: " + ", ".join(
        [k for k in keys if k.startswith(section)] or sorted({k.partition('.')[0] for k in keys})))
    return f"unknown config key {key!r}; {hint}"


def _parse(tp: Any, raw: str, key: str) -> Any:
    """Parse a command-line string into type `tp` (int, float, bool, str, Literal, tuple[...])."""
    origin = get_origin(tp)
    if origin is tuple:
        items = [s.strip() for s in raw.strip("()[]").split(",") if s.strip()]
        args = get_args(tp)
        item_tp = args[0] if args else str
        return tuple(_parse(item_tp, s, key) for s in items)
    try:
        if raw.startswith(("[", "{", '"')) or tp in (int, float, bool):
            value = json.loads(raw.lower() if tp is bool else raw)
        else:
            value = raw
    except json.JSONDecodeError:
        raise ConfigError(f"{key}={raw!r}: expected {_type_name(tp)}") from None
    return _coerce(tp, value, key)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r}: expected one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        return _coerce(args[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        item_tp = get_args(tp)[0] if get_args(tp) else Any
        return tuple(_coerce(item_tp, v, key) for v in value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
