"""The eval harness: one model loaded, and its recall, latency and fidelity cells run one at a time, each returned
as a record. run.py drives a grid of them on a backend's workers (backends.py), which hold one Harness each."""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..batching import decode_rows
from ..cache import load_cache, make_cache, static_refusal
from ..dtypes import cpu_capability
from ..geometry import KVGeometry
from ..models import load_model
from ..prefill import Prefill
from ..static import capture
from ..strategy import parse_strategy
from . import reference_text, text_ids
from .cases import asked_in_place, needle_positions, next_turn, render, score
from .cells import latency_warmup
from .config import ReportConfig
from .fidelity import compare, step_logits
from .latency import percentile, sync, time_generation, timed_prefill
from .tasks import depths, make_case

# what an output-length cell asks after its passage: an answer whose length the model chooses
OUTPUT_REQUEST = "Retell the passage above in detail, scene by scene, in your own words."


def _is_allocation_failure(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _guarded(base: dict, cell: Callable[[], dict]) -> dict:
    """Run one cell; running out of memory is an outcome to record (the first signal a fleet shows), not a crash."""
    try:
        return {**base, "outcome": "ok", **cell()}
    except Exception as err:  # noqa: BLE001  (only allocation failures are swallowed)
        if not _is_allocation_failure(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**base, "outcome": "allocation_failure", "error": str(err).splitlines()[0][:300]}


def needle_survival(cache, needle: range, kv_heads: int, row: int = 0, pad: int = 0) -> dict:
    """The share of the needle's tokens each layer and KV head still holds in `row` (left-padded by `pad` tokens),
    and its mean: beside recall it separates "evicted" from "kept but not used"."""
    per_layer_head = []
    wanted = torch.tensor(list(needle), dtype=torch.int32)
    for layer in cache.layers:
        positions = layer.positions
        if positions is None:  # full or window: the newest `stored` tokens of the padded rows, in every head
            held = torch.arange(layer.seen - layer.stored, layer.seen, dtype=torch.int32).expand(kv_heads, -1) - pad
        elif positions.dim() == 3:  # score-based: per head, each token's position in its row
            held = positions[row].cpu()
        else:  # positional (sink): one set for every head, indices in the padded row
            held = (positions[row] - pad).expand(kv_heads, -1).cpu()
        per_layer_head.append([round(torch.isin(wanted, head).float().mean().item(), 4) for head in held])
    heads = [share for layer in per_layer_head for share in layer]
    return {"mean": sum(heads) / len(heads), "per_layer_head": per_layer_head}


class AnswerFound(StoppingCriteria):
    """Stops a row's generation once its planted answer appears (generation ends when every row's has): scoring is
    "the answer appears anywhere in the output", so the tokens after it cannot change the outcome, only the run
    time."""

    def __init__(self, tokenizer, prompt_tokens: int, answers: list[str | tuple[str, ...]]):
        self.tokenizer, self.prompt_tokens, self.answers = tokenizer, prompt_tokens, answers

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_tokens :], skip_special_tokens=True)
        found = [score(answer, text) for answer, text in zip(self.answers, texts)]
        return torch.tensor(found, dtype=torch.bool, device=input_ids.device)


def _per_row(kv_bytes: dict[str, int], rows: int) -> dict[str, int]:
    return {tier: n // rows for tier, n in kv_bytes.items()}


class Harness:
    def __init__(self, config: ReportConfig):
        self.config = config
        self.model, self.tokenizer = load_model(
            config.model,
            dtype=config.compute_dtype,
            device=config.device,
            kv_dtype=config.kv_dtype,
            weights=config.weights,
        )
        # a random-weight model (random:<arch>) has no tokenizer and answers nothing: memory and latency only
        self.skipped = (
            None
            if self.tokenizer is not None
            else f"{config.model} has random weights and no tokenizer: recall and fidelity mean nothing"
        )
        self._full_logits: torch.Tensor | None = None
        self._fidelity_prefill: Prefill | None = None
        self._text_token_ids: torch.Tensor | None = None
        self._case_prefill: tuple[tuple, Prefill] | None = None  # the last recall batch's contexts, for its strategies
        self._cases: tuple[tuple, list] = ((), [])  # (task, length, turns) and its grid's cases, rendered
        self._recalled: dict[tuple, dict] = {}  # records of batch-mates, until their own cells ask for them
        # strategies that read attention replay a shared prefill only with the attention it recorded
        self.kv_heads = KVGeometry.of(self.model).kv_heads
        needs = {need for s in config.strategies for need in parse_strategy(s).retention.needs}
        self._recorded = {"attention": bool(needs), "mass": "mass" in needs}  # mass takes every query's weights

    def dtypes(self) -> dict[str, str]:
        return {**self.model.dtype_plan.as_record(), "weights": self.model.weights, "cpu_capability": cpu_capability()}

    def run(self, base: dict) -> dict:
        if self.skipped and base["kind"] in ("recall", "fidelity", "output"):
            return {**base, "outcome": "skipped", "reason": self.skipped}
        args = {k: v for k, v in base.items() if k not in ("kind", "id", "model", "round")}  # a round: a cell again
        return _guarded(base, lambda: getattr(self, base["kind"])(**args))

    def _sync_peak(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def _peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.model.device.type == "cuda" else None

    def _context_prefill(self, key: tuple, rows: list[list[int]]) -> Prefill:
        """The prefill of these rows, left-padded to one width: made once, shared by the strategies that follow."""
        if self._case_prefill is None or self._case_prefill[0] != key:
            self._case_prefill = None  # the last batch's K/V go before this one's are made
            ids, mask = self._left_padded(rows)
            padded = None if bool(mask.all()) else mask  # unpadded: exactly the one-case prefill
            self._case_prefill = (key, Prefill.of(self.model, ids, **self._recorded, attention_mask=padded))
        return self._case_prefill[1]

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=self.model.device)
        return ids, mask

    def _batch(self, task: str, length: int, depth: float, seed: int, question: str, turns: int = 1) -> list[tuple]:
        """The cases that run as one left-padded batch with this one, as (case, context ids, question ids, follow-ups
        as `_rendered` makes them): the grid's cases of this task and length in grid order, `recall_batch` at a time;
        with the question after the context only those whose questions have as many tokens (every row's context step
        must end at one column), and with follow-ups those whose later turns have as many tokens too. Fixed by the
        grid, not by which cells are left, so a resumed run batches a case as the first run did."""
        if self._cases[0] != (task, length, turns):
            cases = [
                make_case(task, self.tokenizer, length, d, s, turns)
                for d in depths(self.config.depths)
                for s in range(self.config.seeds)
            ]
            self._cases = ((task, length, turns), [self._rendered(case) for case in cases])
        cases = self._cases[1]
        mine = next((c for c in cases if c[0].key == (task, length, round(depth, 4), seed)), None)
        if mine is None:  # a case outside the grid (a cell of another run's records): alone
            return [self._rendered(make_case(task, self.tokenizer, length, depth, seed, turns))]

        def shape(rendered: tuple) -> tuple:
            _, _, asked, later = rendered
            widths = [len(tokens) for turn in later for tokens in turn]
            return (*widths, len(asked)) if question == "after" else (*widths[1::2],)

        alike = [c for c in cases if shape(c) == shape(mine)]
        start = alike.index(mine) // self.config.recall_batch * self.config.recall_batch
        return alike[start : start + self.config.recall_batch]

    def _rendered(self, case) -> tuple:
        """(case, context ids, question ids, and per follow-up: (its ids asked in the first question's place, its
        ids as the next chat turn))."""
        later = [
            (asked_in_place(self.tokenizer, case, f.question), next_turn(self.tokenizer, case, f.question))
            for f in case.followups
        ]
        return (case, *render(self.tokenizer, case.messages, case.question), later)

    def recall(
        self,
        strategy: str,
        task: str,
        length: int,
        depth: float,
        seed: int,
        question: str = "after",
        turns: int = 1,
        mode: str | None = None,
        turn: int = 0,
    ) -> dict:
        """question="after": the context is prefilled (and compressed) before the question arrives, as in a chat;
        "inside": context and question are one prompt (all but its last token prefilled), so query-aware retention
        sees the question. The case runs in a left-padded batch with others of its task and length (`_batch`); their
        records wait here for their own cells. turns > 1: the case asks `turns` questions in each of the run's modes
        (`_followups`), and this cell is question `turn` in `mode`."""
        key = (strategy, task, length, round(depth, 4), seed, question, mode, turn)
        if key not in self._recalled:
            batch = self._batch(task, length, depth, seed, question, turns)
            if turns == 1:
                turned = {(None, 0): self._recall_batch(strategy, batch, question)}
            else:
                turned = self._followups(strategy, batch, question, turns)
            for (asked_mode, index), records in turned.items():
                for (case, *_), record in zip(batch, records):
                    self._recalled[(strategy, *case.key, question, asked_mode, index)] = record
        return self._recalled.pop(key)

    def _first_prompt(self, strategy: str, batch: list[tuple], question: str, rows: int) -> tuple:
        """A cache for `strategy` holding the batch's shared prefill (the contexts; with the question inside, all
        of the first prompt but its last token), and that prompt's ids, mask and each row's left padding."""
        firsts = [context if question == "after" else context + asked[:-1] for _, context, asked, _ in batch]
        prefill = self._context_prefill(tuple(case.key for case, *_ in batch) + (question,), firsts)
        ids, mask = self._left_padded([context + asked for _, context, asked, _ in batch])
        pads = (mask == 0).sum(dim=1).tolist()  # the same in the prefill: every row's rest has as many tokens
        chunk = self.config.prefill_chunk if parse_strategy(strategy).retention.seam else None
        cache = make_cache(self.model, strategy, prefill_chunk=chunk, batch_size=rows)
        prefill.fill(self.model, cache)
        return cache, ids, mask, pads

    @torch.no_grad()
    def _recall_batch(self, strategy: str, batch: list[tuple], question: str) -> list[dict]:
        cache, ids, mask, pads = self._first_prompt(strategy, batch, question, len(batch))
        with cache:
            return self._answer(cache, ids, mask, batch, pads, 0)[1]

    @torch.no_grad()
    def _followups(self, strategy: str, batch: list[tuple], question: str, turns: int) -> dict[tuple, list[dict]]:
        """Every question of the batch's cases in each of the run's modes, by (mode, question index). The first
        question is the same in both modes (answered once). `reuse` (question after the context only,
        `ReportConfig.modes_for`): every later question starts from the cache as the context left it, saved and
        loaded back (`KVCache.save`, `load_cache`), and is asked in the first question's place. `chat`: one
        conversation, each question a new user turn after the answer before it, on the same cache (eviction goes on
        as the member's `when=` says). A batch's rows generate together, so a row's answer holds what it generated
        until every row of the batch had answered."""
        rows, modes = len(batch), self.config.modes_for(question)
        turned = {}
        cache, first_ids, first_mask, pads = self._first_prompt(strategy, batch, question, rows)
        with cache, tempfile.TemporaryDirectory(prefix="kvcompress-reuse-") as folder:
            saved = Path(folder) / "context.safetensors"
            if "reuse" in modes:
                cache.save(saved)
            out, first = self._answer(cache, first_ids, first_mask, batch, pads, 0)
            turned.update({(mode, 0): first for mode in modes})
            for turn in range(1, turns) if "chat" in modes else ():
                ids = torch.cat([out, self._column([later[turn - 1][1] for *_, later in batch])], dim=1)
                out, turned[("chat", turn)] = self._answer(cache, ids, first_mask, batch, pads, turn)
            for turn in range(1, turns) if "reuse" in modes else ():
                ids, mask = self._left_padded([context + later[turn - 1][0] for _, context, _, later in batch])
                with load_cache(self.model, saved) as restored:
                    turned[("reuse", turn)] = self._answer(restored, ids, mask, batch, pads, turn)[1]
        return turned

    def _column(self, rows: list[list[int]]) -> torch.Tensor:
        """Rows of as many token ids (a batch's next turn), as one tensor on the model's device."""
        return torch.tensor(rows, device=self.model.device)

    def _answer(
        self, cache, ids: torch.Tensor, mask: torch.Tensor, batch: list[tuple], pads: list[int], turn: int
    ) -> tuple[torch.Tensor, list[dict]]:
        """Generate the batch's answers to question `turn` after `ids` (the cache holds all but their uncached
        tail) and score them: (every row's ids with its answer, one record per row). `mask` covers the first
        `mask.shape[1]` columns (the left padding); every column after them is a token."""
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], ids.shape[1] - mask.shape[1])], dim=1)
        rows = len(batch)
        turns = [case.turn(turn) for case, *_ in batch]
        kv_bytes_prefill, peak_prefill = cache.kv_bytes(), cache.peak_bytes
        survival = [
            needle_survival(cache, needle_positions(self.tokenizer, case, asked.needle), self.kv_heads, row, pad)
            for row, ((case, *_), asked, pad) in enumerate(zip(batch, turns, pads))
        ]
        answers = [asked.answer for asked in turns]
        self._sync_peak()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=max(self.config.max_new_tokens, *(case.answer_tokens or 0 for case, *_ in batch)),
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([AnswerFound(self.tokenizer, ids.shape[1], answers)]),
            pad_token_id=self.tokenizer.eos_token_id,
        )
        outputs = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        shared = {
            "kv_bytes_prefill": _per_row(kv_bytes_prefill, rows),
            "kv_bytes_final": _per_row(cache.kv_bytes(), rows),
            "peak_kv_bytes_prefill": peak_prefill // rows,
            "peak_kv_bytes": cache.peak_bytes // rows,
            "peak_device_bytes": self._peak(),  # the batch's (weights included), not divided
            "stored_tokens": cache.stored_tokens(),
            "seen_tokens": cache.get_seq_length(),
            "process_peak_rss_bytes": _peak_rss_bytes(),
            "batch_rows": rows,
        }
        return out, [
            {
                "answer": asked.answer,
                "correct": score(asked.answer, output),
                "prompt_tokens": int(mask[row].sum()),
                "output": output,
                "needle_survival": row_survival["mean"],
                "needle_survival_per_layer_head": row_survival["per_layer_head"],
                **shared,
            }
            for row, (asked, output, row_survival) in enumerate(zip(turns, outputs, survival))
        ]

    def _text_ids(self, length: int, windows: int = 1) -> torch.Tensor:
        if self._text_token_ids is None and self.tokenizer is None:  # random weights: timing ignores the values
            generator = torch.Generator().manual_seed(0)
            self._text_token_ids = torch.randint(0, self.model.config.vocab_size, (4096,), generator=generator)
        if self._text_token_ids is None:  # tokenized once, sliced for every latency and fidelity cell
            path = self.config.fidelity_text
            text = Path(path).read_text() if path else reference_text()
            self._text_token_ids = self.tokenizer(text, return_tensors="pt").input_ids[0]
        return text_ids(self._text_token_ids, length, windows).to(self.model.device)

    def latency(self, strategy: str, length: int) -> dict:
        warmup = latency_warmup(self.config.decode_steps)
        steps = self.config.decode_steps + warmup
        self._sync_peak()
        refusal = static_refusal(parse_strategy(strategy)) if self.config.compile else None
        compile = self.config.compile and refusal is None
        with make_cache(self.model, strategy, compile=compile, max_tokens=length + steps if compile else None) as cache:
            timing = time_generation(self.model, self._text_ids(length), cache, steps)
            kv_bytes_final, fused = cache.kv_bytes(), cache.fused
        decode = timing["decode_s"][warmup:]
        p50 = statistics.median(decode)
        record = {
            "ttft_s": timing["ttft_s"],
            "decode_ms_p50": p50 * 1e3,
            "decode_ms_p95": percentile(decode, 95) * 1e3,
            "tokens_per_s": 1 / p50,
            "decode_ms": [round(1e3 * s, 4) for s in decode],  # every step: the spread verdicts are judged on
            "peak_device_bytes": self._peak(),
            "kv_bytes_final": kv_bytes_final,
            "fused_decode": fused,  # whether decode steps attended over the codes (make_cache's fused)
            "compiled": capture(self.model.device) if compile else None,
        }
        if refusal:  # --compile, and this strategy has no static step: it ran eager
            record["compile_skipped"] = refusal
        if timing["transfer"]:  # offloading tiers: what one decode step moves, and how long the host waited for it
            per_step = {key: value / steps for key, value in timing["transfer"].items()}
            busy = per_step["transfer_s"] + per_step["disk_s"]
            record.update(
                moved_bytes_per_step=sum(v for k, v in per_step.items() if k.endswith("_bytes")),
                transfer_ms_per_step=1e3 * busy,
                stall_ms_per_step=1e3 * per_step["stall_s"],
                # the share of copy/I-O time the host did not wait for: hidden behind compute
                overlap=max(0.0, 1 - per_step["stall_s"] / busy) if busy else None,
                transfer_per_step=per_step,
            )
        return record

    @torch.no_grad()
    def capacity(self, strategy: str, length: int) -> dict:
        """The most concurrent sessions of `length` tokens whose measured peak KV (resident plus the largest
        transient, as `peak_kv_bytes` counts it) fits `kv_budget`, and that batch decoded together. Sessions arrive
        one after another, as a server prefills them: one session's prompt is prefilled (timed: TTFT) and measured,
        and every session is a copy of that cache (`KVCache.copy`: the same prompt gives the same cache), so the
        batch's peak is the larger of the other sessions resident while the last one prefills and the most its decode
        steps hold at once (every cache's resident bytes plus its step's transient). The batch decodes as one ragged
        batch (`decode_rows`), each session a token per step, so a step's time is every session's per-token decode
        latency and the batch's tokens/s is sessions over the median step. It starts from the most sessions both
        bounds admit (the second from one probe step of one copy) and steps down while the batch's measured peak is
        over the budget."""
        budget = self.config.budget_at(length)
        with make_cache(self.model, strategy) as first:
            logits, ttft = timed_prefill(self.model, self._text_ids(length), first)
            token, resident, prefill_peak = int(logits[0, -1].argmax()), first.resident_bytes, first.peak_bytes
            # the most sessions both bounds admit: the others resident while the last prefills, and each holding
            # what one decode step of a copy held (resident plus its transient)
            sessions = 0
            if prefill_peak <= budget:
                step_peak = self._decoded_together(first, 1, token, steps=1)[0]
                sessions = min((budget - prefill_peak) // max(resident, 1) + 1, budget // max(step_peak, 1))
            record = {"kv_budget": budget, "session_peak_kv_bytes": prefill_peak, "session_kv_bytes": resident}
            tried = []
            while sessions > 0:
                stepped, decode = self._decoded_together(first, sessions, token, over=budget)
                peak = max((sessions - 1) * resident + prefill_peak, stepped)
                tried.append([sessions, peak])
                if peak <= budget:
                    p50 = statistics.median(decode)
                    return {
                        **record,
                        "sessions": sessions,
                        "peak_kv_bytes": peak,
                        "tried": tried,  # [sessions, measured peak] of every batch decoded, the admitted one last
                        "ttft_s": ttft,
                        "decode_ms_p50": p50 * 1e3,
                        "decode_ms_p95": percentile(decode, 95) * 1e3,
                        "decode_ms": [round(1e3 * t, 4) for t in decode],
                        "tokens_per_s": sessions / p50,
                    }
                sessions -= 1
        return {**record, "sessions": 0, "tried": tried, "tokens_per_s": 0.0}

    def _decoded_together(
        self, prefilled, sessions: int, token: int, steps: int | None = None, over: int | None = None
    ) -> tuple[int, list[float]]:
        """`sessions` copies of the `prefilled` cache, each next given `token`, decoded as one batch for `steps`
        steps (default: the warm-up and timed steps), or until a step holds more than `over` bytes: the most KV bytes
        a step held (every copy's resident bytes plus its step's transient) and the seconds of the steps after the
        warm-up."""
        warmup = latency_warmup(self.config.decode_steps) if steps is None else 0
        caches = [prefilled.copy() for _ in range(sessions)]
        try:
            peak, tokens, decode = 0, [token] * sessions, []
            for _ in range(warmup + self.config.decode_steps if steps is None else steps):
                for cache in caches:
                    cache.peak_bytes = cache.resident_bytes  # this step's peak
                started = time.perf_counter()
                logits = decode_rows(self.model, caches, tokens)
                sync(self.model.device)
                decode.append(time.perf_counter() - started)
                tokens = logits.argmax(-1).tolist()
                peak = max(peak, sum(cache.peak_bytes for cache in caches))
                if over is not None and peak > over:  # over the budget: the rest of the steps would not change that
                    break
            return peak, decode[warmup:]
        finally:
            for cache in caches:
                cache.close()

    @torch.no_grad()
    def output(self, strategy: str, length: int) -> dict:
        """`outputs` passages of about `length` tokens of the fidelity text, each followed by OUTPUT_REQUEST in one
        user turn, generated greedily as one left-padded batch until each row's EOS or `output_cap` new tokens: how
        many tokens each answer takes (compression that makes answers longer creates end-to-end time per answer)."""
        c = self.config
        passages = self.tokenizer.batch_decode(self._text_ids(length, c.outputs), skip_special_tokens=True)
        rows = []
        for passage in passages:
            context, asked = render(
                self.tokenizer, [{"role": "user", "content": f"{passage}\n\n{OUTPUT_REQUEST}"}], OUTPUT_REQUEST
            )
            rows.append(context + asked)
        ids, mask = self._left_padded(rows)
        chunk = c.prefill_chunk if parse_strategy(strategy).retention.seam else None
        eos = self.tokenizer.eos_token_id
        with make_cache(self.model, strategy, prefill_chunk=chunk, batch_size=len(rows)) as cache:
            started = time.perf_counter()
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                cache=cache,
                max_new_tokens=c.output_cap,
                do_sample=False,
                pad_token_id=eos,
            )
            seconds = time.perf_counter() - started
        answers = out[:, ids.shape[1] :].tolist()
        tokens = [row.index(eos) if eos in row else len(row) for row in answers]  # up to its EOS, EOS excluded
        return {
            "prompt_tokens": [len(row) for row in rows],
            "output_tokens": tokens,
            "capped": [n == c.output_cap for n in tokens],
            "generate_s": seconds,  # the batch's prefill and every step until its longest answer ended
        }

    def fidelity(self, strategy: str) -> dict:
        c = self.config
        ids = self._text_ids(c.fidelity_prefill + c.fidelity_steps, c.fidelity_windows)
        if self._full_logits is None:
            self._fidelity_prefill = Prefill.of(self.model, ids[:, : c.fidelity_prefill], **self._recorded)
            self._full_logits = step_logits(self.model, ids, "full", c.fidelity_prefill, self._fidelity_prefill)
        full = parse_strategy(strategy) == parse_strategy("full")  # the reference itself: no second run
        candidate = (
            self._full_logits
            if full
            else step_logits(self.model, ids, strategy, c.fidelity_prefill, self._fidelity_prefill)
        )
        return compare(self._full_logits, candidate, ids[:, c.fidelity_prefill :].flatten())
