"""Score-based retention on the attention seam, against a plain-torch reference written from each paper's definition.

The reference runs the whole sequence through the model at every step with an attention function that applies an
explicit per-(layer, row, KV head) visibility and records the attention weights; from those weights (and keys) it
chooses what each head keeps, token by token in Python. The cached model must keep exactly the same tokens and give
the same logits. MEMBERS drives every test here: adding a member adds its cases.
"""

import math
import statistics

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from kvcompress import expected_kv_bytes, make_cache, parse_strategy, reconstruct
from kvcompress.cache import seam_retentions
from kvcompress.prefill import Prefill
from kvcompress.retention.base import RetentionView

from .conftest import left_padded, tiny_model

# member -> a strategy small enough that the tiny model evicts at prefill and at most decode steps
MEMBERS = {
    "h2o": "h2o:budget=20,sinks=2,window=4,when=budget",
    "tova": "tova:budget=20,sinks=2,window=4,when=budget",
    "snapkv": "snapkv:budget=20,sinks=2,window=4,observe=8,kernel=3,when=budget",
    "knorm": "knorm:budget=20,sinks=2,window=4,when=budget",
    "pyramid": "pyramid:budget=20,sinks=2,window=4,observe=8,kernel=3,beta=4,when=budget",
    "adakv": "adakv:budget=20,sinks=2,window=4,observe=8,kernel=3,when=interval,interval=4",
    "kvzip": "kvzip:budget=8,sinks=1,window=4,when=prefill",  # scores once: a budget the first of STEPS[1] exceeds
}
RATIO = {
    "h2o": "h2o:ratio=0.4,sinks=2,window=4,when=budget",
    "snapkv": "snapkv:ratio=0.4,when=interval,interval=5",
    "tova": "tova:ratio=0.4,observe=8,kernel=3,sinks=2,window=4,when=budget",  # tova: its window and pooling
    "kvzip": "kvzip:ratio=0.2,layers=equal",
}  # kvzip: every layer the same budget
STEPS = [
    [(0, 40)] + [(t, t + 1) for t in range(40, 52)],  # prefill, then decode
    [(0, 9), (9, 30), (30, 31), (31, 44), (44, 45), (45, 46)],
]  # multi-token steps


def test_members_table_covers_every_score_member():
    assert set(MEMBERS) == set(seam_retentions())


# -- the reference ---------------------------------------------------------------------------------------------------
_visible: dict[int, torch.Tensor] = {}  # layer -> [batch, kv heads, T, T] bool
# layer -> (weights [b, kv heads, T, T] the mean and the max over the KV head's query heads, keys [b, h, T, d])
_seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, hq, t, d = query.shape
    h = key.shape[1]
    scores = query.view(b, h, hq // h, t, d) @ key[:, :, None].transpose(-1, -2) * scaling
    scores = scores.masked_fill(~_visible[module.layer_idx][:, :, None], float("-inf"))
    probs = scores.softmax(-1)
    _seen[module.layer_idx] = (probs.mean(2), probs.amax(2), key)
    out = (probs @ value[:, :, None]).view(b, hq, t, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("kvc_reference", _reference_attention)
AttentionMaskInterface.register("kvc_reference", sdpa_mask)


def _pooled(votes: list[float], kernel: int) -> list[float]:
    half = kernel // 2
    return [max(votes[max(0, i - half) : i + half + 1]) for i in range(len(votes))]


def _choose(retention, entries, score, capacity, sinks, window, newest):
    """Storage indices kept, from `entries` [(t, position or -1)], by the member's score: sinks and the recent window
    protected, padding never chosen over a real token, ties to the older entry."""

    def rank(i):
        position = entries[i][1]
        if position < 0:
            return -math.inf
        if position < sinks or position > newest - window:
            return math.inf
        return score[i]

    order = sorted(range(len(entries)), key=lambda i: (-rank(i), -i))  # ties: the newer entry
    return sorted(order[:capacity])


class Reference:
    """What each (layer, row, KV head) stores, step by step, by the papers' definitions."""

    def __init__(self, model, strategy, ids, mask):
        self.model, self.retention, self.ids, self.mask = model, parse_strategy(strategy).retention, ids, mask
        self.layers, self.heads = model.config.num_hidden_layers, model.config.num_key_value_heads
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = ids.shape[0]
        # per layer, row, head: list of [t, live]; mass per t
        self.store = [[[[] for _ in range(self.heads)] for _ in range(batch)] for _ in range(self.layers)]
        self.mass = [[[{} for _ in range(self.heads)] for _ in range(batch)] for _ in range(self.layers)]
        self.steps = 0
        self.last_eviction = [0] * self.layers
        total = ids.shape[1]
        self.visible = [torch.zeros(batch, self.heads, total, total, dtype=torch.bool) for _ in range(self.layers)]

    def position(self, row, t, live=True):
        return int(self.positions[row, t]) if live and self.mask[row, t] else -1

    @torch.no_grad()
    def step(self, start, stop):
        batch = self.ids.shape[0]
        for layer in range(self.layers):
            # a query keeps the visibility of its own step, so earlier tokens' hidden states are recomputed as they were
            visible = self.visible[layer][:, :, :stop, :stop]
            for row in range(batch):
                for head in range(self.heads):
                    held = [t for t, live in self.store[layer][row][head] if live and self.mask[row, t]]
                    for q in range(start, stop):
                        keys = held + [t for t in range(start, q + 1) if self.mask[row, t]]
                        visible[row, head, q, keys] = True
                        visible[row, head, q, q] = True
            _visible[layer] = visible
        logits = self.model(
            input_ids=self.ids[:, :stop], attention_mask=self.mask[:, :stop], position_ids=self.positions[:, :stop]
        ).logits[:, start:stop]
        seen = stop
        for layer in range(self.layers):
            weights, _, keys = _seen[layer]
            capacity = self.retention.capacity(seen, layer, self.layers)
            for row in range(batch):
                for head in range(self.heads):
                    self.store[layer][row][head] += [[t, True] for t in range(start, stop)]
            stored = len(self.store[layer][0][0])
            due = self.retention.due(
                stored, seen, layer, self.layers, self.steps, self.steps - self.last_eviction[layer]
            )
            chosen = {}
            for row in range(batch):
                newest = int(self.positions[row, stop - 1])
                for head in range(self.heads):
                    entries = [(t, self.position(row, t, live)) for t, live in self.store[layer][row][head]]
                    mass = self.mass[layer][row][head]
                    for t, _ in entries:
                        mass[t] = mass.get(t, 0.0) + float(weights[row, head, start:stop, t].sum())
                    if due:
                        score = self.score(layer, row, head, entries, weights, keys, start, stop)
                        chosen[row, head] = (entries, score, newest)
            if due:
                self.evict(layer, chosen, capacity)
        self.steps += 1
        if self.retention.name == "kvzip" and self.steps == 1:
            self.reconstruct(stop)
        return logits

    @torch.no_grad()
    def reconstruct(self, n):
        """KVzip: the prompt fed again after itself, its copy seeing the prompt and itself causally; each prompt token
        scores the most attention any query of the copy gives it in any query head of its KV head."""
        batch = self.ids.shape[0]
        mask = torch.cat([self.mask[:, :n], self.mask[:, :n]], dim=1)
        for layer in range(self.layers):
            visible = torch.zeros(batch, self.heads, 2 * n, 2 * n, dtype=torch.bool)
            visible[:, :, :n, :n] = self.visible[layer][:, :, :n, :n]  # the prompt's queries as they ran
            for row in range(batch):
                for head in range(self.heads):
                    for q in range(n, 2 * n):  # a padding query sees itself alone
                        if mask[row, q]:
                            visible[row, head, q, [t for t in range(q + 1) if mask[row, t]]] = True
                        visible[row, head, q, q] = True
            _visible[layer] = visible
        self.model(
            input_ids=torch.cat([self.ids[:, :n], self.ids[:, :n]], dim=1),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        )
        chosen = []  # per layer
        for layer in range(self.layers):
            peak = _seen[layer][1]
            chosen.append({})
            for row in range(batch):
                for head in range(self.heads):
                    entries = [(t, self.position(row, t, live)) for t, live in self.store[layer][row][head]]
                    score = [float(peak[row, head, n:, t].max()) for t, _ in entries]
                    chosen[layer][row, head] = (entries, score, int(self.positions[row, n - 1]))
        capacity = self.retention.capacity(n)
        if self.retention.layers == "ranked":
            capacity = self.layer_capacities(chosen, capacity)
        for layer in range(self.layers):
            self.evict(layer, chosen[layer], capacity[layer] if isinstance(capacity, list) else capacity)

    def layer_capacities(self, chosen, capacity):
        """KVzip's ranking of every (layer, head, token) score, stored densely: per row, a layer is as wide as its head
        holding most of the model's top scores, the widths summing to layers x capacity: each layer's profile (at rank
        j, the best j-th score of its heads), the top layers x capacity profile entries of the model (ties: the later
        entry in (layer, rank) order) counted by layer, at least one token a layer. Returns per layer {row: width}."""
        r, layers = self.retention, self.layers
        capacities = [{} for _ in range(layers)]
        for row in range(self.ids.shape[0]):
            profile = []  # (score, layer) in (layer, rank) order
            for layer in range(layers):
                ranked = []
                for head in range(self.heads):
                    entries, score, newest = chosen[layer][row, head]
                    ranks = [
                        -math.inf
                        if position < 0
                        else math.inf
                        if position < r.sinks or position > newest - r.window
                        else score[i]
                        for i, (t, position) in enumerate(entries)
                    ]
                    ranked.append(sorted(ranks, reverse=True))
                profile += [(max(column), layer) for column in zip(*ranked)]
            order = sorted(range(len(profile)), key=lambda j: (-profile[j][0], -j))[: layers * capacity]
            for layer in range(layers):
                capacities[layer][row] = max(1, sum(1 for j in order if profile[j][1] == layer))
        return capacities

    def score(self, layer, row, head, entries, weights, keys, start, stop):
        name = self.retention.name
        ts = [t for t, _ in entries]
        if name == "h2o":
            return [self.mass[layer][row][head][t] for t in ts]
        if name == "knorm":
            return [-float(keys[row, head, t].float().norm()) for t in ts]
        observe = range(max(start, stop - self.retention.observe), stop)
        if name == "tova":  # the last `observe` queries (the paper's: 1), averaged over every head of the layer, then
            # over `kernel` neighbours
            votes = [float(sum(weights[row, :, q, t].mean() for q in observe)) for t in ts]
            half = self.retention.kernel // 2
            return [statistics.fmean(votes[max(0, i - half) : i + half + 1]) for i in range(len(votes))]
        votes = [float(sum(weights[row, head, q, t] for q in observe)) for t in ts]
        return _pooled(votes, self.retention.kernel)  # snapkv, pyramid, adakv

    def evict(self, layer, chosen, capacity):
        """capacity: tokens per head, or {row: tokens per head}."""
        self.last_eviction[layer] = self.steps
        r = self.retention
        selected = {}  # row -> {(head, storage index)}
        for row in {row for row, _ in chosen}:
            kept = capacity[row] if isinstance(capacity, dict) else capacity
            if r.name != "adakv":
                # H2O's recent tokens: `recent` of what the sinks leave of the budget (at least `window`)
                window = max(r.window, int(r.recent * (kept - r.sinks))) if r.name == "h2o" else r.window
                selected[row] = set()
                for head in range(self.heads):
                    entries, score, newest = chosen[row, head]
                    selected[row] |= {(head, i) for i in _choose(r, entries, score, kept, r.sinks, window, newest)}
                continue
            ranked = []  # Ada-KV: (rank, head, storage index) over the layer's heads, which share its budget
            for head in range(self.heads):
                entries, score, newest = chosen[row, head]
                own = set(_choose(r, entries, score, int(r.floor * kept), r.sinks, r.window, newest))
                for i, (_, position) in enumerate(entries):
                    protected = position >= 0 and (position < r.sinks or position > newest - r.window)
                    rank = -math.inf if position < 0 else math.inf if (protected or i in own) else score[i]
                    ranked.append((rank, head, i))
            order = sorted(range(len(ranked)), key=lambda j: (-ranked[j][0], -j))[: self.heads * kept]
            selected[row] = {(ranked[j][1], ranked[j][2]) for j in order}
        # one storage width for the layer: the widest head of any row; narrower heads keep their newest as filler
        width = max(sum(1 for h, _ in picks if h == head) for picks in selected.values() for head in range(self.heads))
        for row, picked in selected.items():
            for head in range(self.heads):
                store = self.store[layer][row][head]
                picks = [i for i in range(len(store)) if (head, i) in picked]
                filler = [i for i in reversed(range(len(store))) if (head, i) not in picked][: width - len(picks)]
                self.store[layer][row][head] = [
                    [store[i][0], store[i][1] and (head, i) in picked] for i in sorted(picks + filler)
                ]

    def kept(self, layer, row, head):
        return sorted(
            self.position(row, t, live) for t, live in self.store[layer][row][head] if self.position(row, t, live) >= 0
        )


def distinct_tokens(lengths):
    """Left-padded ids without repeated tokens: a repeated token's key has the same norm at every position (RoPE
    rotates), an exact tie whose order float rounding would decide differently in the reference."""
    ids, mask = left_padded(lengths)
    ids[:] = torch.randperm(509, generator=torch.Generator().manual_seed(1))[: ids.shape[1]] + 3
    return ids.masked_fill(mask == 0, 0), mask


def _cached(model, cache, ids, mask, steps):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for start, stop in steps:
            out = model(
                input_ids=ids[:, start:stop],
                attention_mask=mask[:, :stop],
                position_ids=positions[:, start:stop],
                cache=cache,
                use_cache=True,
            )
            yield start, stop, out.logits


def _kept(cache, layer, row, head):
    positions = cache.layers[layer].positions[row, head]
    return sorted(int(p) for p in positions if p >= 0)


@pytest.fixture(scope="module")
def reference_model():
    model = tiny_model("eager")
    model.set_attn_implementation("kvc_reference")
    return model


@pytest.mark.parametrize("steps", STEPS, ids=["decode", "multi-token"])
@pytest.mark.parametrize("strategy", list(MEMBERS.values()) + list(RATIO.values()), ids=lambda s: s.split(":")[0])
def test_kept_tokens_and_logits_match_the_reference(tiny, reference_model, strategy, steps):
    ids, mask = distinct_tokens([52, 37])
    cache = make_cache(tiny, strategy)
    reference = Reference(reference_model, strategy, ids, mask)
    layers, heads = tiny.config.num_hidden_layers, tiny.config.num_key_value_heads
    evicted = False
    for start, stop, logits in _cached(tiny, cache, ids, mask, steps):
        expected = reference.step(start, stop)
        for row in range(2):
            real = mask[row, start:stop].bool()
            assert torch.allclose(logits[row][real], expected[row][real], atol=1e-4, rtol=0), (start, stop)
            for layer in range(layers):
                for head in range(heads):
                    assert _kept(cache, layer, row, head) == reference.kept(layer, row, head), (start, layer, row, head)
        evicted |= cache.layers[0].stored < stop
    assert evicted and cache.get_seq_length() == steps[-1][1]


def _prefill_and_decode(model, strategy, ids, mask, decode=12, **cache_kwargs):
    cache = make_cache(model, strategy, **cache_kwargs)
    steps = [(0, ids.shape[1] - decode)] + [(t, t + 1) for t in range(ids.shape[1] - decode, ids.shape[1])]
    logits = torch.cat([out for _, _, out in _cached(model, cache, ids, mask, steps)], dim=1)
    return cache, logits


@pytest.mark.parametrize("strategy", list(MEMBERS.values()), ids=list(MEMBERS))
def test_left_padded_batch_equals_each_row_alone(tiny, strategy):
    # adakv pads every row's heads to the batch's widest: after the first eviction a batch holds other filler than a
    # row alone, and SnapKV's pooling sees its neighbours through it, so later evictions may differ; compare the first
    strategy = strategy.replace("when=interval,interval=4", "when=prefill")
    ids, mask = distinct_tokens([52, 37])
    batched, logits = _prefill_and_decode(tiny, strategy, ids, mask)
    for row, length in enumerate([52, 37]):
        alone, row_logits = _prefill_and_decode(
            tiny, strategy, ids[row : row + 1, -length:], mask[row : row + 1, -length:]
        )
        assert torch.allclose(logits[row, -length:], row_logits[0], atol=1e-4, rtol=0)
        for layer in range(tiny.config.num_hidden_layers):
            for head in range(tiny.config.num_key_value_heads):
                assert _kept(batched, layer, row, head) == _kept(alone, layer, 0, head)


@pytest.mark.parametrize("strategy", list(MEMBERS.values()), ids=list(MEMBERS))
def test_storage_falls_to_the_budget_and_matches_the_analytic_size(tiny, strategy):
    strategy += ",when=budget" if "when=" not in strategy else ""  # the analytic size: eviction whenever over budget
    ids, mask = distinct_tokens([52, 52])
    # a member that evicts once (kvzip) holds the budget after the prompt, then every token after it
    cache, _ = _prefill_and_decode(tiny, strategy, ids, mask, decode=0 if "when=prefill" in strategy else 12)
    full, _ = _prefill_and_decode(tiny, "full", ids, mask)
    measured, expected = cache.kv_bytes()["device"], expected_kv_bytes(tiny, strategy, 52, batch=2)
    if parse_strategy(strategy).retention.name == "adakv":  # padded to the widest head: more than nominal, counted
        assert expected <= measured <= expected * 1.5
    else:
        assert measured == expected
    for layer in cache.layers:  # storage is freed, not pinned by views of the pre-eviction tensors
        tensor = layer.recent_k.read()
        assert tensor.untyped_storage().nbytes() == tensor.nbytes
    assert measured < 0.6 * full.kv_bytes()["device"]


@pytest.mark.parametrize("member", list(MEMBERS))
def test_composes_with_int8_and_the_disk_tier(tiny, member, tmp_path):
    """The tier changes where tokens live, never the numbers: disk equals device bit for bit, with int8."""
    ids, mask = distinct_tokens([52, 37])
    strategy = MEMBERS[member] + "+int8:residual=4"
    device, device_logits = _prefill_and_decode(tiny, strategy, ids, mask)
    disk, disk_logits = _prefill_and_decode(tiny, strategy + "+disk", ids, mask, offload_dir=str(tmp_path))
    assert torch.equal(device_logits, disk_logits)
    assert [layer.stored for layer in disk.layers] == [layer.stored for layer in device.layers]
    assert disk.kv_bytes()["device"] < device.kv_bytes()["device"]
    plain, _ = _prefill_and_decode(tiny, MEMBERS[member], ids, mask)
    assert device.kv_bytes()["device"] < 0.6 * plain.kv_bytes()["device"]
    disk.close()


@pytest.mark.parametrize("strategy", [MEMBERS["h2o"], MEMBERS["snapkv"], "tova:budget=20,when=budget"])
def test_chunked_prefill_equals_chunk_by_chunk_steps_and_holds_less(tiny, strategy):
    ids, mask = distinct_tokens([52, 37])
    chunked, chunked_logits = _prefill_and_decode(tiny, strategy, ids, mask, prefill_chunk=8)
    manual = make_cache(tiny, strategy)
    steps = [(t, min(t + 8, 40)) for t in range(0, 40, 8)] + [(t, t + 1) for t in range(40, 52)]
    logits = torch.cat([out for _, _, out in _cached(tiny, manual, ids, mask, steps)], dim=1)
    real = mask.bool()
    assert torch.allclose(chunked_logits[real], logits[real], atol=1e-4, rtol=0)
    for layer in range(tiny.config.num_hidden_layers):
        assert torch.equal(chunked.layers[layer].positions, manual.layers[layer].positions)
    whole, _ = _prefill_and_decode(tiny, strategy, ids, mask)
    # chunks hold budget + chunk = 28 of the prompt's 40 tokens: 0.7 of its K/V, beside the step's copies and weights
    assert chunked.peak_bytes < 0.85 * whole.peak_bytes


def test_generate_with_beam_search_keeps_score_state_in_step(tiny):
    ids, mask = distinct_tokens([30, 22])
    cache = make_cache(tiny, MEMBERS["h2o"])
    out = tiny.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=cache,
        max_new_tokens=40,
        min_new_tokens=40,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (4, 70)
    for layer in cache.layers:
        assert layer.stored == 20 and layer.mass.shape == layer.positions.shape == (6, 2, 20)


def test_bad_input_is_refused_before_any_work(tiny):
    with pytest.raises(ValueError, match="pass the model to make_cache"):
        make_cache(tiny.config, "h2o:budget=64")
    with pytest.raises(ValueError, match="prefill_chunk needs a score-based retention"):
        make_cache(tiny, "sink:window=64", prefill_chunk=16)
    with pytest.raises(ValueError, match="prefill_chunk must be a positive"):
        make_cache(tiny, "h2o:budget=64", prefill_chunk=0)
    with pytest.raises(ValueError, match=r"unknown strategy part 'h20'.*Did you mean 'h2o'"):
        parse_strategy("h20:budget=64")
    with pytest.raises(ValueError, match="allowed: budget, ratio, sinks, window, when, interval, observe, kernel"):
        parse_strategy("snapkv:budgett=64")
    with pytest.raises(ValueError, match=r"tova:observe must be >= 1"):
        parse_strategy("tova:budget=64,observe=0")
    with pytest.raises(ValueError, match=r"tova:kernel must be an odd number >= 1"):
        parse_strategy("tova:budget=64,kernel=4")
    with pytest.raises(ValueError, match="must exceed snapkv:sinks"):
        parse_strategy("snapkv:budget=36,sinks=4,window=32")
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        parse_strategy("h2o:ratio=1.5")
    with pytest.raises(ValueError, match="must not exceed h2o:window"):
        parse_strategy("h2o:budget=64+int8:residual=128")
    with pytest.raises(ValueError, match=r"h2o:recent must be in \[0, 1\)"):
        parse_strategy("h2o:budget=64,recent=1")
    with pytest.raises(ValueError, match="kvzip:when must be prefill"):
        parse_strategy("kvzip:budget=64,when=budget")
    with pytest.raises(ValueError, match="kvzip:chunk must be >= 1"):
        parse_strategy("kvzip:budget=64,chunk=0")
    with pytest.raises(ValueError, match="kvzip:layers must be one of ranked, equal"):
        parse_strategy("kvzip:budget=64,layers=heads")
    with pytest.raises(ValueError, match="pass the model to make_cache"):
        make_cache(tiny.config, "kvzip:budget=64")
    with pytest.raises(ValueError, match="leave prefill_chunk out"):
        make_cache(tiny, "kvzip:budget=64", prefill_chunk=16)


def test_kvzip_scores_the_prompt_by_reconstructing_it_under_generate(tiny):
    """generate's prompt forward is followed by the reconstruction (the model's forward hook): the cache then holds
    the budget of the prompt plus what came after it, has seen only the real tokens, and counted the copy's
    transient, less of it in chunks; reset, it scores its next prompt. A cache holding another prompt than the ids is
    refused."""
    ids, mask = distinct_tokens([30, 22])
    peaks = {}
    for chunk in (64, 7):
        cache = make_cache(tiny, f"kvzip:budget=12,chunk={chunk}")
        out = tiny.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape == (2, 36) and not cache.after_prompt_due and cache.get_seq_length() == 35
        assert all(layer.reconstruction is None for layer in cache.layers)
        for row in range(2):  # the layers' budgets are ranked: 12 per head on average, then the 5 new tokens
            assert sum(int((layer.positions[row] >= 0).sum()) for layer in cache.layers) == (12 + 5) * 2 * 2
        peaks[chunk] = cache.peak_bytes
    cache.reset()  # a reused cache scores its next prompt too
    tiny.generate(input_ids=ids[:1], cache=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not cache.after_prompt_due and sum(layer.stored for layer in cache.layers) == (12 + 1) * 2
    full = make_cache(tiny, "full")
    tiny.generate(input_ids=ids, attention_mask=mask, cache=full, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert peaks[7] < peaks[64] and peaks[7] > full.peak_bytes  # the prompt whole, and a chunk's copy beside it
    cache = make_cache(tiny, "kvzip:budget=12")
    cache.after_prompt_due = False  # a forward that does not reconstruct by itself
    with torch.no_grad():
        tiny(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="it holds 30 tokens, input_ids has 20"):
        reconstruct(tiny, cache, ids[:, :20])


@pytest.mark.parametrize("high, expected", [(4, [4, 1, 1]), (5, [5, 1, 1])])
def test_kvzip_ranks_every_layers_heads_together(high, expected):
    """3 layers x 3 heads at budget 2 (6 tokens a head over the model): layer 0's first head scores `high` tokens
    above everything, its other heads nothing; layer 1's heads one token each; layer 2's every token 0.4 (or nothing:
    it still keeps one). A layer is as wide as its head holding most of the model's top 6 (by the heads' mean, layer
    2 would take 5), and keeps at least one token; every head of it keeps its own top that many."""
    spots = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    scores = torch.zeros(3, 1, 3, 8)
    scores[0, 0, 0, spots[:high]] = torch.linspace(0.9, 0.5, high)
    scores[1, 0, :] = 0.02
    scores[1, 0, :, spots[0]] = 0.85
    scores[2, 0, :] = 0.4 if high == 4 else 0.0
    views = [
        RetentionView(8, 8, torch.arange(8).expand(1, 3, 8), layer=layer, layers=3, reconstruction=scores[layer])
        for layer in range(3)
    ]
    retention = parse_strategy("kvzip:budget=2").retention
    capacities = retention.layer_capacities(views)
    assert [int(c) for c in capacities] == expected
    assert parse_strategy("kvzip:budget=2,layers=equal").retention.layer_capacities(views) == [None] * 3
    kept = retention.keep(RetentionView(**{**views[0].__dict__, "capacity": capacities[0]}))
    assert kept.index.shape == (1, 3, high) and bool(kept.live.all())
    assert kept.index[0, 0].tolist() == sorted(spots[:high].tolist())


def test_an_unrouted_model_is_caught_at_the_next_step(tiny):
    model = tiny_model("sdpa")
    cache = make_cache(model, "h2o:budget=20,sinks=2,window=4")
    model.set_attn_implementation("sdpa")  # undoes the routing: the layer's attention never runs
    ids, mask = distinct_tokens([30])
    with torch.no_grad(), pytest.raises(RuntimeError, match="not routed through the kvcompress seam"):
        model(input_ids=ids, cache=cache, use_cache=True)


@pytest.mark.parametrize("strategy, rows", [("tova:budget=20", 1), ("snapkv:budget=20,observe=8", 8)])
def test_a_prompt_holds_the_weights_of_the_queries_its_member_reads(tiny, strategy, rows):
    """A prompt's attention weights are prompt x prompt per query head: a member that reads its last queries' holds
    theirs only, live and replayed from a shared prefill alike (knorm, which reads no attention, is the baseline)."""
    ids = distinct_tokens([48])[0]
    with torch.no_grad():
        peaks = {}
        for member in (strategy, "knorm:budget=20", "h2o:budget=20"):
            cache = make_cache(tiny, member)
            tiny(input_ids=ids, cache=cache, use_cache=True)
            peaks[member] = cache.peak_bytes
        replayed = {}
        for member in (strategy, "h2o:budget=20"):
            replayed[member] = make_cache(tiny, member)
            Prefill.of(tiny, ids, attention=True).fill(tiny, replayed[member])
    weights = tiny.config.num_attention_heads * rows * 48 * 4  # float32, one layer's at a time
    assert peaks[strategy] - peaks["knorm:budget=20"] == weights
    assert peaks["h2o:budget=20"] - peaks["knorm:budget=20"] > 48 // rows * weights / 2  # h2o reads every query's
    assert all(replayed[member].peak_bytes == peaks[member] for member in replayed)


def test_h2o_sums_a_prompts_attention_a_block_of_queries_at_a_time(tiny, monkeypatch):
    """h2o reads every query's attention: a prompt's is computed WEIGHT_ROWS queries at a time, so the step holds one
    block's weights, not prompt x prompt per query head (4 GiB per head at 32k tokens), and keeps what one block
    would."""
    ids, mask = distinct_tokens([52, 37])
    whole, whole_logits = _prefill_and_decode(tiny, MEMBERS["h2o"], ids, mask)  # the prompt: 40 tokens, one block
    monkeypatch.setattr("kvcompress.attention.WEIGHT_ROWS", 16)
    blocks, block_logits = _prefill_and_decode(tiny, MEMBERS["h2o"], ids, mask)
    assert torch.allclose(whole_logits, block_logits, atol=1e-5, rtol=0)
    for one, other in zip(whole.layers, blocks.layers):
        assert torch.equal(one.positions, other.positions)
        torch.testing.assert_close(one.mass, other.mass)
    assert whole.peak_bytes - blocks.peak_bytes == 2 * tiny.config.num_attention_heads * (40 - 16) * 40 * 4


@pytest.mark.parametrize("strategy", ["knorm:budget=20", "tova:budget=20"])
def test_a_prompt_builds_no_mask_per_query_head(tiny, strategy, monkeypatch):
    """A prompt into an empty layer attends causally without a mask; a left-padded one under one mask for every
    head, [batch, 1, prompt, prompt], never repeated per query head (1 GiB per head at 32k tokens). The cache counts
    that mask in its peak, live and replayed from a shared prefill alike."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    peaks = {}
    with torch.no_grad():
        for lengths in ([40, 40], [40, 31]):
            ids, mask = distinct_tokens(lengths)
            masks.clear()
            cache = make_cache(tiny, strategy)
            tiny(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                cache=cache,
                use_cache=True,
            )
            assert set(masks) == ({None} if lengths[1] == 40 else {(2, 1, 40, 40)})
            assert len(masks) == tiny.config.num_hidden_layers
            peaks[lengths[1]] = cache.peak_bytes
            replayed = make_cache(tiny, strategy)
            Prefill.of(tiny, ids, attention=True, attention_mask=mask).fill(tiny, replayed)
            assert replayed.peak_bytes == cache.peak_bytes
    assert peaks[31] - peaks[40] == 2 * 40 * 40  # the bool mask, one layer's at a time


@pytest.mark.parametrize("mass", [True, False])
@pytest.mark.parametrize("member", list(MEMBERS))
def test_a_shared_prefill_replays_exactly(tiny, member, mass):
    """The harness prefills a case once and hands every strategy its K/V and recorded attention: each member must
    keep what a live prefill keeps, and decode the same. Recorded without mass (no grid member sums every query's
    attention), a member that needs it prefills for real."""
    ids = distinct_tokens([44])[0]
    strategy = MEMBERS[member] + "+int8:residual=4"
    live, live_logits = _prefill_and_decode(tiny, strategy, ids, torch.ones_like(ids))
    replayed = make_cache(tiny, strategy)
    needs = parse_strategy(strategy).retention.needs
    prefill = Prefill.of(tiny, ids[:, :32], attention=bool(needs), mass=mass)
    assert prefill.replays_exactly(replayed) == (mass or "mass" not in needs)
    logits = [prefill.fill(tiny, replayed)[:, None]]
    with torch.no_grad():
        for t in range(32, 44):
            logits.append(tiny(input_ids=ids[:, t : t + 1], cache=replayed, use_cache=True).logits)
    assert torch.allclose(torch.cat(logits, 1), live_logits[:, 31:], atol=1e-5, rtol=0)
    for live_layer, layer in zip(live.layers, replayed.layers):
        assert torch.equal(live_layer.positions, layer.positions)
