"""What every results file records about how it was made."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from .version import __version__

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return f"{cpu or platform.machine()} ({torch.get_num_threads()} threads)"


def provenance(model: str, device: str | torch.device | None, command: list[str] | None = None) -> dict:
    """device None: the caller adds it (a Ray run names its workers' device, not the driver's)."""
    return {
        "command": shlex.join(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": model,
        **({} if device is None else {"device": device_name(device)}),
        # a copy of the repo without .git (a GPU box) names its commit through the environment
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("KVCOMPRESS_GIT_COMMIT", ""),
        # results/ holds outputs, not code: a run writing there does not make the code that ran dirty
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")),
        "versions": {
            "kvcompress": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def provenance_lines(meta: dict) -> list[str]:
    """The Markdown bullet lines every results file opens with."""
    return [
        f"- command: `{meta['command']}`",
        f"- model: {meta['model']}; device: {meta['device']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- git commit: {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}; started {meta['date']}",
    ]
