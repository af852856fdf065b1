"""Where a decode step's time goes, per strategy: wall ms (synchronized), host launch ms (not synchronized), device
allocations and frees per step, and the top host-side CUDA API and torch ops from torch.profiler.

    python experiments/gpu/profile_decode.py [--model random:llama-3.1-8b] [--context 8192] [--strategies a;b]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import kvcompress


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--strategies", default="DynamicCache;full;full+host;int8;int8+host")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model, _ = kvcompress.load_model(args.model, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device="cuda")
    for strategy in args.strategies.split(";"):
        cache = (
            DynamicCache(config=model.config) if strategy == "DynamicCache" else kvcompress.make_cache(model, strategy)
        )
        logits = model(input_ids=ids, cache=cache, logits_to_keep=1).logits
        walls, launches = [], []
        stats = torch.cuda.memory_stats()
        for _ in range(args.steps):
            token = logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(input_ids=token, cache=cache).logits
            launches.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
        after = torch.cuda.memory_stats()
        per_step = {
            k: (after.get(k, 0) - stats.get(k, 0)) / args.steps
            for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
        }
        print(
            f"\n== {strategy} @ {args.context}: wall {statistics.median(walls) * 1e3:.1f} ms, host launch "
            f"{statistics.median(launches) * 1e3:.1f} ms; per step {per_step}"
        )
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                logits = model(input_ids=logits[:, -1:].argmax(-1), cache=cache).logits
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
