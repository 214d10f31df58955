"""Plain-folder adapter, the fallback of auto-detection: every media file is a clip, no labels."""

from __future__ import annotations

from pathlib import Path

from vqmae.datasets.base import Adapter, ClipInfo, Found, iter_media


class FolderAdapter(Adapter):
    # No `detect`: auto-detection picks this adapter when no other one recognises the tree.
    name = "folder"

    def scan(self, root: Path) -> Found:
        """Every media file under `root`, speaker = its parent folder's name, no labels."""
        clips, skipped = [], []
        for media in iter_media(root, skipped):
            speaker = media.rel[-2] if len(media.rel) > 1 else root.name
            clips.append(ClipInfo(clip_id=media.clip_id, path=media.path, dataset="folder",
                                  speaker=speaker, has_video=media.is_video))
        return clips, skipped
