"""The seam's side of a cache layer (attention.py routes the model's attention here): a step's attention over what
the layer stores plus the step's K/V, under the layer's own mask (heads may keep different tokens), the statistics its
retention reads, a pass over the context that only scores (a retention's `after_prompt`), and the fused decode path
that attends over the codes. Mixed into `KVLayer` (cache.py), whose storage methods it calls (layer_storage.py)."""

from __future__ import annotations

from typing import Any

import torch

from .attention import grouped_attention, mask_visible, new_token_valid
from .kernels.decode import attend_encoded, auto_backend, chunk_tokens
from .layer_storage import held_bytes
from .retention.base import RetentionView

FUSED_QUERIES = 16  # steps of at most this many queries attend over encoded KV directly; longer ones decode it


class SeamSteps:
    """The steps of a layer whose retention runs on the attention seam, or whose decode steps attend over codes."""

    def attend(self, query: torch.Tensor, attention_mask, scaling: float, kwargs: dict[str, Any]) -> torch.Tensor:
        """Run this step's attention for `query` [batch, query heads, q, dim] over what the layer stores plus the
        step's K/V (handed over by `update`), chunk by chunk under `prefill_chunk`, evicting after each chunk.
        Returns the attention output [batch, q, query heads, dim]."""
        new_k, new_v, compute = self._stash
        self._stash = None
        batch, q = query.shape[0], query.shape[2]
        softcap = kwargs.get("softcap")
        if not self.retention.seam:  # a fused decode step of a positional retention: the model's mask applies
            visible = mask_visible(attention_mask, batch, q, self.stored + q, self.device)
            out, _, _, transient = self._attend_over(query, new_k, new_v, visible, scaling, softcap, compute)
            self.recent_k.append(new_k)
            self.recent_v.append(new_v)
            self._store_plain(new_k, kwargs)
            self._end_step(transient)
            return out
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.shape != (batch, q):
            position_ids = torch.arange(self.seen, self.seen + q, device=self.device).expand(batch, q)
        valid = new_token_valid(attention_mask, batch, q, self.device)
        positions = position_ids.to(self.device, torch.int32).masked_fill(~valid, -1)
        if self.reconstruction is not None:
            return self._score_reconstruction(query, new_k, new_v, positions, scaling, softcap, compute)
        chunk = self.prefill_chunk or q
        outputs = []
        for start in range(0, q, chunk):
            step = slice(start, min(start + chunk, q))
            outputs.append(
                self._attend_chunk(
                    query[:, :, step],
                    new_k[:, :, step],
                    new_v[:, :, step],
                    positions[:, step],
                    scaling,
                    softcap,
                    compute,
                )
            )
        self.steps += 1
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _visible(self, new_positions: torch.Tensor) -> torch.Tensor | None:
        """What the step's queries see of [stored | step]: [batch, heads or 1, n, stored + n] bool, or None (a prompt
        into an empty layer without padding: causal, no mask). A padding query sees itself alone (its output is never
        read, and what it attends to must not count: a pass over the context has padding after stored tokens)."""
        batch, n = new_positions.shape
        real = new_positions >= 0
        if not self.stored and bool(real.all()):
            return None
        held = self.positions >= 0  # [batch, heads, stored]
        if n > 1 and bool((held == held[:, :1]).all()):
            held = held[:, :1]  # every KV head sees the same tokens: one mask for all (q x s bytes a head)
        heads = held.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=self.device)
        step = (causal & real[:, None, None, :]) | eye
        return torch.cat([held[:, :, None] & real[:, None, :, None], step.expand(batch, heads, n, n)], dim=-1)

    def _attend_chunk(self, query, new_k, new_v, new_positions, scaling, softcap, compute) -> torch.Tensor:
        visible = self._visible(new_positions)
        needs = self.retention.needs
        rows = self.retention.attention_rows if "attention" in needs else 0
        out, probs, mass, transient = self._attend_over(
            query,
            new_k,
            new_v,
            visible,
            scaling,
            softcap,
            compute,
            rows=rows,
            per_key="mass" if "mass" in needs else None,
        )
        transient += visible.nbytes if visible is not None else 0
        attention = probs.mean(dim=2) if probs is not None else None  # pooled over the query heads of a KV head
        self._store_step(new_k, new_v, new_positions, attention, mass, compute)
        self._end_step(transient)
        return out

    def _score_reconstruction(self, query, new_k, new_v, new_positions, scaling, softcap, compute) -> torch.Tensor:
        """A step of a pass over the context (a retention's `after_prompt`): attend over [stored | step] as any step,
        raise each stored token's score to the most attention a query gave it, and store nothing."""
        visible = self._visible(new_positions)
        out, _, peak, transient = self._attend_over(
            query, new_k, new_v, visible, scaling, softcap, compute, per_key="peak"
        )
        torch.maximum(self.reconstruction, peak[..., : self.stored], out=self.reconstruction)
        self._end_step(transient + visible.nbytes + self.reconstruction.nbytes)
        return out

    def reconstruction_view(self) -> RetentionView:
        """What the retention sees once a pass over the context scored every stored token."""
        return self._view(reconstruction=self.reconstruction)

    def evict_reconstructed(self, view: RetentionView) -> None:
        """Evict by the scores the reconstruction left (`view`), then leave the scoring mode."""
        self.reconstruction = None
        self._evict(view)
        self._end_step(0)

    def _history_and(self, new_k: torch.Tensor, new_v: torch.Tensor, compute: torch.dtype):
        """[every stored token decoded | the step's], K and V, in the compute dtype."""
        if self.encoded_k:
            return (
                self._with_history("k", new_k, compute, for_attention=True),
                self._with_history("v", new_v, compute, for_attention=True),
            )
        return (
            torch.cat([self.recent_k.read(), new_k], dim=2).to(compute),
            torch.cat([self.recent_v.read(), new_v], dim=2).to(compute),
        )

    def _fuses(self, queries: int) -> bool:
        """Whether a step of this many queries attends over the codes (a fused layer's decode step, with codes)."""
        return self.fused and bool(self.encoded_k) and queries <= FUSED_QUERIES

    def _attend_over(
        self, query, new_k, new_v, visible, scaling, softcap, compute, rows: int = 0, per_key: str | None = None
    ):
        """The step's attention over [stored | step] (visible [b, h or 1, q, stored + q], or None: causal, the step
        alone into an empty layer): read from the codes for a fused decode step that needs no weights and no softcap
        (Gemma 2), else over the decoded history. Returns the output, the float32 weights of the last `rows` queries
        (or None), with `per_key` what each key received from the step's queries (grouped_attention), and the bytes
        the step allocated beside the storage (its mask aside)."""
        if rows or per_key or softcap is not None or not self._fuses(new_k.shape[2]):
            keys, values = self._history_and(new_k, new_v, compute)
            out, probs, summed, scratch = grouped_attention(
                query, keys, values, visible, scaling, softcap, rows, per_key
            )
            return out, probs, summed, held_bytes(keys, values) + scratch + (probs.nbytes if probs is not None else 0)
        n_encoded = self.n_encoded
        tail_k = torch.cat([self.recent_k.read(), new_k], dim=2).to(compute)
        tail_v = torch.cat([self.recent_v.read(), new_v], dim=2).to(compute)
        packed_k = {name: part.read() for name, part in self.encoded_k.items()}
        packed_v = {name: part.read() for name, part in self.encoded_v.items()}
        batch, heads, _, dim = new_k.shape
        chunk = (batch, heads, min(chunk_tokens(batch, heads, dim), n_encoded), dim)
        decoded, buffer = 0, None  # the Triton kernel decodes in registers
        if auto_backend(query, self.codec) == "torch":  # a chunk of K, then of V, decoded into one float32 buffer
            decoded = batch * heads * chunk[2] * dim * 4
            if self.workspace is not None and not torch.is_grad_enabled():  # memory already touched
                buffer = self.workspace.take("k", chunk, torch.float32, new_k.device)
                decoded = held_bytes(buffer)
        out = attend_encoded(
            query,
            self.codec,
            packed_k,
            packed_v,
            visible[:, :, -1, :n_encoded],
            tail_k,
            tail_v,
            visible[..., n_encoded:],
            scaling,
            buffer=buffer,
        )
        return out, None, None, decoded + tail_k.nbytes + tail_v.nbytes
