"""Kernels: quantization primitives in plain PyTorch (the CPU reference every fused kernel is tested against).

This folder ships as `kvcompress.kernels`. Python started in the repo root (`python -c`, `python -m pytest`, a notebook,
a Ray worker) has the root on sys.path and would find it as the top-level `kernels`, which is the name of a PyPI package
that transformers imports; imported under that name it loads the installed package in its place."""

import importlib.machinery
import importlib.util
import os
import sys


def load_installed(name: str, folder: str) -> None:
    """Put the installed top-level package `name` in sys.modules in place of the repo folder `folder` (found as `name`
    because its parent is on sys.path); the import system returns what sys.modules holds once a module has run."""
    root = os.path.dirname(os.path.abspath(folder))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r} (the repo folder {name}/ is kvcompress.{name})", name=name)
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])


if "." not in __name__:
    load_installed(__name__, os.path.dirname(__file__))
else:
    from .quant import (
        dequantize_scaled,
        pack_nibbles,
        quantize_affine,
        quantize_scaled,
        scale_groups,
        unpack_nibbles,
    )

__all__ = [
    "dequantize_scaled",
    "pack_nibbles",
    "quantize_affine",
    "quantize_scaled",
    "scale_groups",
    "unpack_nibbles",
]
