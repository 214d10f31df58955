"""`vqmae inspect` (being written)."""


def inspect() -> None:
    """Not implemented yet."""
    raise SystemExit("vqmae inspect: not implemented yet")
