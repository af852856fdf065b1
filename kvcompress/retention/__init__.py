from . import full, sinks, window  # noqa: F401  (registers the members)
from .base import RETENTIONS, Retention

__all__ = ["RETENTIONS", "Retention"]
