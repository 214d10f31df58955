"""Deterministic demo corpus: talking-face clips whose emotion is really in the voice and the face.

`synthesize(out_dir, cfg)` writes

    OUT/video/<speaker>/<clip>.mp4   H.264 yuv420p, 25 fps, frame_size² + AAC mono audio
    OUT/audio/<speaker>/<clip>.wav   16-bit PCM mono (audio-only clips)
    OUT/manifest.csv                 path, speaker, label, valence, arousal, dominance, split
    OUT/synth.json                   format, config, seed, speakers, counts

Modules, lowest first: `profiles` (emotion profiles, speakers), `voice` (source-filter speech),
`face` (the astronaut() face, warped per speaker, emotion and frame), `corpus` (clip plan, media
files, the parallel writer, manifest and summary). A per-clip intensity scales how far a clip moves
from neutral, in the signal and in its valence / arousal / dominance, so classes overlap but stay
learnable. Every clip draws from its own RNG seeded by (seed, speaker, clip), so any number of
worker processes produce the same files as a serial run.
"""

from vqmae.demo.corpus import (FORMAT, MANIFEST_COLUMNS, Clip, ClipParams, ClipRecord, ClipSpec, SynthError,
                               clip_params, clip_rng, make_clip, manifest_bytes, manifest_counts, plan,
                               read_summary, synthesize, validate, write_clip)
from vqmae.demo.face import FaceRenderer, mouth_box
from vqmae.demo.profiles import EMOTIONS, FPS, Emotion, Speaker, make_speaker, speaker_name
from vqmae.demo.voice import synth_voice

__all__ = [
    "EMOTIONS", "FORMAT", "FPS", "MANIFEST_COLUMNS", "Clip", "ClipParams", "ClipRecord", "ClipSpec",
    "Emotion", "FaceRenderer", "Speaker", "SynthError", "clip_params", "clip_rng", "make_clip",
    "make_speaker", "manifest_bytes", "manifest_counts", "mouth_box", "plan", "read_summary", "speaker_name",
    "synth_voice", "synthesize", "validate", "write_clip",
]
