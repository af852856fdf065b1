"""Evaluation harness: texts and (issue 3) recall tasks, fidelity, latency, memory and the report."""

from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"


def reference_text() -> str:
    """A public-domain English text (the US Declaration of Independence, 1776) for teacher-forced fidelity."""
    return (DATA_DIR / "declaration_of_independence.txt").read_text()


def text_ids(token_ids: torch.Tensor, length: int) -> torch.Tensor:
    """A [1, length] batch of a text's token ids, repeated as often as `length` needs."""
    return token_ids.repeat(length // len(token_ids) + 1)[:length][None]
