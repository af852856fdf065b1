"""`kvcompress.lm_eval.KVCompressLM` for `lm_eval.simple_evaluate`; the code lives in kvcompress.evals.lm_eval."""

from .evals.lm_eval import KVCompressLM, KVCTask, task_manager  # noqa: F401

__all__ = ["KVCompressLM", "KVCTask", "task_manager"]
