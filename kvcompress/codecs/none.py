from dataclasses import dataclass

from .base import CODECS, Codec


@CODECS.register("none")
@dataclass(frozen=True)
class NoCodec(Codec):
    """Tokens stay in the model dtype."""

    lossless = True

    def bytes_per_token(self, head_dim, dtype):
        return head_dim * dtype.itemsize
