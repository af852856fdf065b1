from dataclasses import dataclass

import torch

from .base import RETENTIONS, Retention


@RETENTIONS.register("sink")
@dataclass(frozen=True)
class SinkRetention(Retention):
    """StreamingLLM (Xiao et al. 2023, arXiv:2309.17453): the first `sinks` real tokens of each row plus the last
    `window` tokens.

    Sinks are chosen per row after the left padding, else pad tokens would become the sinks. A row whose real
    tokens do not yet exceed the budget keeps its last `sinks + window` positions instead, so the stored layout always
    ends with the window and the padding mask transformers slices at `kv_offset` lines up with what is stored.
    """

    sinks: int = 4
    window: int = 1024
    needs_positions = True

    def __post_init__(self):
        if self.window <= 0:
            raise ValueError(f"sink:window must be > 0, got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"sink:sinks must be >= 0, got {self.sinks}")
        if self.sinks > self.window:
            raise ValueError(f"sink:sinks ({self.sinks}) must not exceed sink:window ({self.window})")

    def capacity(self, seen: int, layer: int = 0, layers: int = 1) -> int:
        return self.sinks + self.window

    def keep(self, view):
        budget, positions = self.sinks + self.window, view.positions
        if view.stored <= budget:
            return None
        sink_start = torch.clamp(view.pad, max=view.seen - budget)[:, None]
        is_sink = (positions >= sink_start) & (positions < sink_start + self.sinks)
        keep = is_sink | (positions >= view.seen - self.window)
        return keep.nonzero()[:, 1].view(positions.shape[0], budget)
