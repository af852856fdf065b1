"""Evaluation harness: texts and (issue 3) recall tasks, fidelity, latency, memory and the report."""

from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


def reference_text() -> str:
    """A public-domain English text (the US Declaration of Independence, 1776) for teacher-forced fidelity."""
    return (DATA_DIR / "declaration_of_independence.txt").read_text()
