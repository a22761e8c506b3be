"""`phasewatch` — the trainer CLI."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("phasewatch: not built yet")
