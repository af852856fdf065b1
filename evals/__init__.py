"""Evaluation harness: recall tasks, fidelity, latency, memory and the report; this module holds the shipped texts.

This folder ships as `kvcompress.evals`; found as the top-level `evals` (Python started in the repo root) it loads the
installed package of that name instead, as kernels/ does."""

import os
from pathlib import Path

if "." not in __name__:
    from kvcompress.kernels import load_installed

    load_installed(__name__, os.path.dirname(__file__))

import torch

DATA_DIR = Path(__file__).parent / "data"


def reference_text() -> str:
    """A long public-domain English text for teacher-forced fidelity and perplexity: Jane Austen's Northanger Abbey
    (1818), about 98k tokens, so that its windows are disjoint (data/README.md)."""
    return (DATA_DIR / "northanger_abbey.txt").read_text()


def haystack_text() -> str:
    """A public-domain English text (the US Declaration of Independence, 1776): the essay haystack of RULER's tasks."""
    return (DATA_DIR / "declaration_of_independence.txt").read_text()


def text_ids(token_ids: torch.Tensor, length: int, windows: int = 1) -> torch.Tensor:
    """A [windows, length] batch of a text's token ids: windows start at evenly spread offsets of the text, which is
    repeated as often as they need."""
    stride = len(token_ids) // windows
    repeated = token_ids.repeat((windows - 1) * stride // len(token_ids) + length // len(token_ids) + 2)
    return torch.stack([repeated[w * stride : w * stride + length] for w in range(windows)])
