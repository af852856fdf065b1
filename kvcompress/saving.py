"""The file a compressed cache is saved in: safetensors, every layer's tensors as they are stored (encoded parts,
model-dtype tokens, positions, score state: never decoded, never re-quantized), and a JSON header in the
safetensors metadata that says what the tensors are for: the strategy, the model they were computed by (its shape
from the config and a fingerprint of its weights), the KV and compute dtypes, the kvcompress version, tokens seen and
stored, each layer's counters and a SHA-256 of every tensor. `KVCache.save` writes it, `load_cache` (cache.py)
reads it back into a fresh cache; this module knows the file, not the cache.

A write goes to a temporary file beside the target, synced, then renamed over it: a crash or a full disk leaves the
old file (or none) and never half of one. A read checks the header, the checksums and the model before it builds
anything, so a truncated, corrupt or foreign file is one error naming the file and what differs."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .dtypes import dtype_name
from .geometry import decoder_config, head_dim
from .version import __version__

FORMAT = "kvcompress-cache/1"
HEADER_KEY = "kvcompress"
# what K/V depend on beside the weights: the shapes, and the rotary embedding (not in the weights: inv_freq is
# computed from the config)
SHAPE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
)
SAMPLED = 4096  # elements of each weight tensor the fingerprint reads (a whole 8B model would take seconds)


def model_identity(model_or_config: Any) -> dict[str, Any]:
    """What a saved cache's K/V depend on: the model's shape (from its config) and, for a model, a fingerprint of
    its weights (SHA-256 over every tensor's name, shape, dtype and SAMPLED evenly spaced elements)."""
    config = decoder_config(model_or_config)
    identity: dict[str, Any] = {field: getattr(config, field, None) for field in SHAPE_FIELDS}
    identity["head_dim"] = head_dim(config)
    identity = json.loads(json.dumps(identity, default=str))  # as the header holds it (tuples become lists)
    state = model_or_config.state_dict() if hasattr(model_or_config, "state_dict") else None
    if state is not None:
        digest = hashlib.sha256()
        for name, tensor in state.items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.device.type == "meta":  # offloaded by accelerate: no values here to sample
                continue
            flat = tensor.detach().flatten()
            sample = flat[:: max(1, flat.numel() // SAMPLED)][:SAMPLED].cpu().contiguous()
            digest.update(sample.view(torch.uint8).numpy().tobytes())
        identity["weights"] = digest.hexdigest()
        identity["compute_dtype"] = dtype_name(getattr(model_or_config, "dtype", torch.float32))
    return identity


def checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def write(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> int:
    """Write `tensors` (CPU, contiguous) and `header` (with their checksums added) to `path` atomically; returns
    the bytes on disk."""
    path = Path(path)
    header = {"format": FORMAT, "kvcompress": __version__, **header}
    header["checksums"] = {name: checksum(t) for name, t in tensors.items()}
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # one per save
    os.close(handle)
    temporary = Path(name)
    try:
        save_file(tensors, str(temporary), metadata={HEADER_KEY: json.dumps(header)})
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path.stat().st_size


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and the tensors (on the CPU) of a saved cache, every checksum verified. Raises ValueError naming
    the file for a missing, truncated, corrupt or unknown file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no saved cache at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{str(path)!r} is not a complete saved cache (truncated or corrupt?): {err}") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{str(path)!r} has no kvcompress header: not a file KVCache.save wrote") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is in format {header.get('format')!r}; this kvcompress reads {FORMAT!r}")
    sums = header.get("checksums", {})
    if set(sums) != set(tensors):
        raise ValueError(f"{str(path)!r} is corrupt: its tensors are not the ones its header lists")
    for name, tensor in tensors.items():
        if checksum(tensor) != sums[name]:
            raise ValueError(f"{str(path)!r} is corrupt: tensor {name!r} does not match its checksum")
    return header, tensors


def check_model(path: str | Path, saved: dict[str, Any], model_or_config: Any) -> None:
    """Refuse, naming what differs, a model other than the one the saved K/V were computed by."""
    current = model_identity(model_or_config)
    for field, value in saved.items():
        if field in current and current[field] != value:
            shown = "" if field == "weights" else f": saved {value!r}, this model {current[field]!r}"
            raise ValueError(f"{str(path)!r} was saved for another model (its {field} differ{shown})")
