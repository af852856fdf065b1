# importing the members registers them
from . import adakv, full, h2o, knorm, kvzip, pyramid, sinks, snapkv, tova, window  # noqa: F401
from .base import RETENTIONS, Kept, Retention, RetentionView, ScoreRetention

__all__ = ["RETENTIONS", "Kept", "Retention", "RetentionView", "ScoreRetention"]
