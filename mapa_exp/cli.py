"""What the command lines share (train.py, evaluate.py and scripts/): their ``--help`` text."""

from __future__ import annotations


def description(doc: str | None) -> str:
    """A script's ``--help`` description: the first paragraph of its docstring, as one sentence or more (the first
    line alone stopped mid-sentence)."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines())
