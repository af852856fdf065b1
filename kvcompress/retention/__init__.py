from . import adakv, full, h2o, knorm, pyramid, sinks, snapkv, tova, window  # noqa: F401  (registers the members)
from .base import RETENTIONS, Kept, Retention, RetentionView, ScoreRetention

__all__ = ["RETENTIONS", "Kept", "Retention", "RetentionView", "ScoreRetention"]
