"""The token store: every clip's discrete codes in one Zarr v3 directory group (docs/design.md §3).

Writers (`StoreWriter`, one per shard) never touch the store at ``PATH``: they commit segments
under ``PATH.parts/``, and `merge` folds every finished segment into a new store swapped in by
renames, so killed writers or merges neither lose nor duplicate a clip. `TokenStore` reads a merged
store. The package is split by role, each module importing only those before it:

    schema     format tag, clip-table columns, `ModalitySpec`, errors, record and code checks
    segments   segment files under ``PATH.parts/``, their metadata, `pending`
    reader     `TokenStore`
    writer     `StoreWriter`, `committed_ids`
    merging    `merge` and its lock
"""

from vqmae.store.merging import MergeSummary, merge
from vqmae.store.reader import TokenStore
from vqmae.store.schema import (FORMAT, ModalitySpec, StoreError, StoreMismatchError, check_specs,
                                parse_shard, parts_dir, table_columns)
from vqmae.store.segments import PendingInfo, list_segments, list_tmp_segments, pending
from vqmae.store.writer import StoreWriter, committed_ids

__all__ = ["FORMAT", "MergeSummary", "ModalitySpec", "PendingInfo", "StoreError",
           "StoreMismatchError", "StoreWriter", "TokenStore", "check_specs", "committed_ids",
           "list_segments", "list_tmp_segments", "merge", "parse_shard", "parts_dir", "pending",
           "table_columns"]
