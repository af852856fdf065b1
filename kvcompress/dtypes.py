"""KV dtype is not compute dtype. The KV a report describes is held as the deployment holds it (bfloat16 on GPUs),
but a CPU without bfloat16 arithmetic computes bfloat16 several times slower than float32 (a 1k-token prefill of the
default model: 33 s vs 5.7 s on 2 AVX2 cores). There the model computes in float32 and the cache stores its
full-precision KV in bfloat16: cast on write, widened on read, so measured bytes are bfloat16 bytes."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU feature flags (/proc/cpuinfo) that give native arithmetic in a half-precision dtype, per vector ISA family
_NATIVE_FLAGS = {
    torch.bfloat16: {"x86": {"avx512_bf16", "amx_bf16"}, "arm": {"bf16"}},
    torch.float16: {"x86": {"avx512_fp16", "amx_fp16"}, "arm": {"fphp", "asimdhp"}},
}
WEIGHTS = ("nf4", "fp4", "int8")  # weight precisions load_model quantises to with bitsandbytes


def parse_dtype(dtype: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    """'bfloat16' -> torch.bfloat16; None stays None; anything else raises ValueError naming `name`."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cast_on_write(kv_dtype: torch.dtype | None, keys: torch.Tensor, values: torch.Tensor):
    """K/V as a cache stores them: in `kv_dtype` (None: as they arrive); attention gets them widened back."""
    if kv_dtype is None or keys.dtype == kv_dtype:
        return keys, values
    return keys.to(kv_dtype), values.to(kv_dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_capability() -> str:
    """The vector ISA torch dispatches to (AVX2, AVX512, ...); ATEN_CPU_CAPABILITY lowers it."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU, at the ISA torch dispatches to, has arithmetic in `dtype` (float32 always does)."""
    if dtype not in _NATIVE_FLAGS:
        return True
    capability = cpu_capability()
    if platform.machine().lower() in ("aarch64", "arm64"):
        family = "arm"
    elif capability.startswith("AVX512"):
        family = "x86"
    else:  # AVX2 and below have no half-precision arithmetic: torch converts every element
        return False
    return bool(_NATIVE_FLAGS[dtype][family] & cpu_flags())


@dataclass(frozen=True)
class DtypePlan:
    compute: torch.dtype
    kv: torch.dtype
    reason: str

    def as_record(self) -> dict[str, str]:
        return {"compute_dtype": dtype_name(self.compute), "kv_dtype": dtype_name(self.kv), "dtype_reason": self.reason}


def plan_dtypes(
    kv_dtype: str | torch.dtype, device: str | torch.device = "cpu", compute_dtype: str | torch.dtype | None = None
) -> DtypePlan:
    """The compute dtype for KV held in `kv_dtype` on `device`: the one asked for, else the KV dtype where the device
    computes it natively, else float32."""
    kv = parse_dtype(kv_dtype, "kv_dtype")
    asked = parse_dtype(compute_dtype, "compute_dtype")
    if asked is not None:
        return DtypePlan(asked, kv, f"compute dtype {dtype_name(asked)} asked for")
    if torch.device(device).type != "cpu":
        return DtypePlan(kv, kv, f"{torch.device(device).type} computes in the KV dtype")
    if cpu_computes_natively(kv):
        return DtypePlan(kv, kv, f"this CPU ({cpu_capability()}) computes {dtype_name(kv)} natively")
    forced = "".join(
        f", {name}={os.environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if name in os.environ
    )  # lowered by hand, e.g. to time what an AVX2 machine does
    return DtypePlan(
        torch.float32,
        kv,
        f"this CPU ({cpu_capability()}{forced}) has no native {dtype_name(kv)} "
        "arithmetic, so the model computes in float32",
    )
