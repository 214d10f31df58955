"""The adapter registry and the entry points built on it: `ADAPTERS` (kind → adapter class),
`detect_kind` (which adapter a tree's layout calls for) and `scan` (run one, then apply the rules
every corpus shares: option checks, one clip per id, sorted output, no silent empty result)."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

from vqmae.datasets.base import (AUDIO_EXTS, VIDEO_EXTS, Adapter, ClipInfo, DatasetError, ScanResult,
                                 _listdir)
from vqmae.datasets.cremad import CremadAdapter
from vqmae.datasets.enterface import EnterfaceAdapter
from vqmae.datasets.folder import FolderAdapter
from vqmae.datasets.manifest import ManifestAdapter
from vqmae.datasets.ravdess import RavdessAdapter
from vqmae.datasets.voxceleb2 import VoxCeleb2Adapter

# The package's logger, not this module's: log records keep the name "vqmae.datasets" they had
# before the adapters were split into modules, so logging configuration and filters still match.
log = logging.getLogger("vqmae.datasets")

# One line per adapter. The order is the order of detection and of the kinds listed in errors.
ADAPTERS: dict[str, type[Adapter]] = {adapter.name: adapter for adapter in (
    RavdessAdapter,
    CremadAdapter,
    EnterfaceAdapter,
    VoxCeleb2Adapter,
    ManifestAdapter,
    FolderAdapter,
)}

# ---------------------------------------------------------------------------------------- detection

DETECT_DEPTH = 4  # `vox2/dev/mp4/id00012` sits three levels down; leave one spare
FALLBACK_KIND = FolderAdapter.name  # a tree no adapter recognises is a plain folder of media


def _kinds_at(level: list[Path], adapters: list[Adapter]) -> set[str]:
    """Corpora confirmed by the folders of one level; each kind is confirmed once, so a level of
    6,000 VoxCeleb2 speaker folders costs a couple of directory listings, not 6,000."""
    found: set[str] = set()
    for d in level:
        for adapter in adapters:
            if adapter.name not in found and adapter.detect(d):
                found.add(adapter.name)
    return found


def detect_kind(root: str | os.PathLike) -> str:
    """Guess the adapter for `root` from its layout (see `scan`). The shallowest level holding a
    recognised folder decides; two corpora recognised at that level is an error."""
    root = Path(os.path.abspath(root))
    if not root.exists():
        raise DatasetError(f"{root}: does not exist")
    adapters = [cls() for cls in ADAPTERS.values()]
    for adapter in adapters:
        if adapter.detect_root(root):
            return adapter.name
    if root.is_file():
        raise DatasetError(f"{root}: expected a dataset directory or a .csv manifest")
    level = [root]
    for _ in range(DETECT_DEPTH + 1):
        found = _kinds_at(level, adapters)
        if len(found) > 1:
            raise DatasetError(f"{root}: layout matches several corpora ({', '.join(sorted(found))}); "
                               f"pass kind= explicitly")
        if found:
            return found.pop()
        level = [Path(e.path) for d in level for e in _listdir(d) if e.is_dir()]
        if not level:
            break
    return FALLBACK_KIND


# ---------------------------------------------------------------------------------------- scan


def _check_options(kind: str, adapter: Adapter, options: dict[str, Any]) -> None:
    params = inspect.signature(adapter.scan).parameters
    known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DatasetError(f"unknown option(s) {', '.join(unknown)} for the {kind} adapter; "
                           f"known: {', '.join(known) or 'none'}")


def _unique_ids(clips: list[ClipInfo], skipped: list[tuple[str, str]]) -> list[ClipInfo]:
    """Sort by clip_id; where two files map to one id keep the video, skip the other with a reason."""
    kept: dict[str, ClipInfo] = {}
    for clip in sorted(clips, key=lambda c: (c.clip_id, not c.has_video, c.path)):
        if clip.clip_id in kept:
            skipped.append((clip.path, f"clip id {clip.clip_id!r} already used by "
                                       f"{kept[clip.clip_id].path}"))
            continue
        kept[clip.clip_id] = clip
    return list(kept.values())


def _no_clips_error(root: Path, kind: str, skipped: list[tuple[str, str]]) -> DatasetError:
    if not skipped:
        return DatasetError(f"{root}: no media files found (video: {' '.join(VIDEO_EXTS)}; "
                            f"audio: {' '.join(AUDIO_EXTS)})")
    path, reason = skipped[0]
    return DatasetError(f"{root}: no usable {kind} clips; {len(skipped)} file(s) skipped, "
                        f"first: {path}: {reason}")


def scan(root: str | os.PathLike, kind: str = "auto", **options: Any) -> ScanResult:
    """List the clips of the corpus at `root`, sorted by clip_id (same tree → same list).

    kind: "auto" or one of `ADAPTERS`. "auto" picks csv for a .csv file or a directory holding
    manifest.csv; ravdess for `Actor_NN` folders holding RAVDESS names; cremad for `VideoFlash` /
    `AudioWAV` folders holding CREMA-D names; enterface for `subject N` folders holding emotion
    folders; voxceleb2 for `idNNNNN` folders holding video folders with media; folder otherwise.
    options: keyword options of the chosen adapter (e.g. `speech_only=True` for ravdess,
    `missing="error"` for csv); an option the adapter does not take is an error.
    Raises DatasetError for a missing root, a root without usable media, or a bad manifest.
    """
    root_path = Path(os.path.abspath(root))
    if not root_path.exists():
        raise DatasetError(f"{root_path}: does not exist")
    if kind == "auto":
        kind = detect_kind(root_path)
        log.info("%s: detected a %s corpus", root_path, kind)
    if kind not in ADAPTERS:
        raise DatasetError(f"{root_path}: unknown dataset kind {kind!r}; expected auto or one of "
                           f"{', '.join(ADAPTERS)}")
    adapter = ADAPTERS[kind]()
    _check_options(kind, adapter, options)
    if not adapter.accepts_file and not root_path.is_dir():
        raise DatasetError(f"{root_path}: the {kind} adapter expects a directory")
    clips, skipped = adapter.scan(root_path, **options)
    clips = _unique_ids(clips, skipped)
    skipped.sort()
    if not clips:
        raise _no_clips_error(root_path, kind, skipped)
    for path, reason in skipped:
        log.debug("skipped %s: %s", path, reason)
    result = ScanResult(kind=kind, root=str(root_path), clips=clips, skipped=skipped)
    log.info("%s: %s", root_path, result.summary())
    return result
