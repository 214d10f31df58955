"""`vqmae synth` (being written)."""


def synth() -> None:
    """Not implemented yet."""
    raise SystemExit("vqmae synth: not implemented yet")
