import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kvcompress
from kvcompress.models import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (pyproject's addopts run two workers) each worker computes on its share of the cores, so
    the workers do not contend for them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    # the CLI's tables fill the terminal's width: one width for the tests, whatever terminal (or none) runs them
    os.environ["COLUMNS"] = "120"


def pytest_collection_modifyitems(items):
    """The tests that start Ray run one after another on one worker (xdist_group "ray"): the longest serial share of
    the suite. They go first, in their own order, so the other worker fills the time around them rather than waiting
    for them at the end."""
    first = [item for item in items if _xdist_group(item) == "ray"]
    items[:] = first + [item for item in items if _xdist_group(item) != "ray"]


def _xdist_group(item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    return None if marker is None else (marker.args or [marker.kwargs.get("name")])[0]


def head_commit() -> str:
    """The checkout's commit, which every results file must name."""
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk: raises where the file is not a PNG image."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise AssertionError(f"{path} is not a PNG image")
    return struct.unpack(">II", head[16:24])


def tiny_model(attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    config = AutoConfig.for_model(**json.loads((CONFIG_DIR / "tiny.json").read_text()))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).eval()


@pytest.fixture(scope="session", params=["eager", "sdpa"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def default_model():
    # float32 compute and KV, asked for: the same numerics on every CPU, whatever its bfloat16 support
    return kvcompress.load_model("default", dtype="float32")


def left_padded(batch_lengths: list[int], vocab: int = 512, seed: int = 0):
    """Random token ids, left-padded to the longest row, with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(batch_lengths)
    ids = torch.randint(3, vocab, (len(batch_lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(batch_lengths):
        mask[row, width - length :] = 1
        ids[row, : width - length] = 0
    return ids, mask
