"""lm-eval task class for the kvcompress recall tasks (this file sits beside the YAMLs that name it)."""

from kvcompress.evals.lm_eval_recall import KVCTask  # noqa: F401
