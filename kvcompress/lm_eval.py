"""`kvcompress.lm_eval.KVCompressLM` for `lm_eval.simple_evaluate`; the code lives in kvcompress.evals.lm_eval_model
(the model) and kvcompress.evals.lm_eval_recall (the tasks)."""

from .evals.lm_eval_model import KVCompressLM  # noqa: F401
from .evals.lm_eval_recall import KVCTask, task_manager  # noqa: F401

__all__ = ["KVCompressLM", "KVCTask", "task_manager"]
