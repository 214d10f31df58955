"""`vqmae ingest` (being written)."""


def ingest() -> None:
    """Not implemented yet."""
    raise SystemExit("vqmae ingest: not implemented yet")
