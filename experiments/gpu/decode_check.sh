#!/usr/bin/env bash
# The GPU check of fused decode over encoded KV and of capacity at a KV budget: one script, under 9 minutes on one
# H100/H200.
#
#   bash experiments/gpu/decode_check.sh [OUT_DIR] [decode_check.py options]    (OUT_DIR defaults to results/gpu)
#
# 1. the fused-decode tests on the GPU (tests/test_fused.py: the Triton kernel compiled, against the torch path);
# 2. decode_check.py: correctness, HBM bandwidth, decode ms/token and peak memory, fused and compiled (static step)
#    rows (OUT_DIR/decode.json and .md);
# 3. the pressure-transfer report on a random-weight Llama-3.1-8B shape (OUT_DIR/report/);
# 4. its capacity cells: the most 8k-token sessions whose measured peak KV fits 8 GiB (about 4 of `full`), decoded
#    as one batch, sessions and tokens/s against `full`'s (OUT_DIR/capacity/).
# setup.sh makes kvcompress importable there (.whl/ wheels, or the repo laid out as pip installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-results/gpu}
shift || true
source experiments/gpu/setup.sh
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(pwd)  # `python -m` runs from /tmp: it puts the working directory on sys.path, where the repo's kvcompress/
# (without kernels/ and evals/ laid in) and kernels/ would shadow the installed packages
if python3 -c "import pytest" 2>/dev/null; then
  (cd /tmp && timeout 120 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib "$repo/tests/test_fused.py" \
    2>&1 | tail -15) | tee "$out/decode_tests.txt" || echo "fused-decode tests failed or timed out"
fi
PYTHONUNBUFFERED=1 timeout 330 python3 experiments/gpu/decode_check.py --out "$out" "$@"
(cd /tmp && PYTHONUNBUFFERED=1 timeout 120 python3 -m kvcompress.cli report --device cuda --model random:llama-3.1-8b \
  --lengths 8k --strategies full,int8,fp8,int4,sink:sinks=4,window=2044,full+host --decode-steps 16 --kv-budget none \
  --out "$out/report") \
  || echo "report failed or timed out"
(cd /tmp && PYTHONUNBUFFERED=1 timeout 180 python3 -m kvcompress.cli report --device cuda --model random:llama-3.1-8b \
  --lengths 8k --strategies full,int8,int4,sink:sinks=4,window=2044 --decode-steps 16 --latency-rounds 2 \
  --capacity-rounds 2 --kv-budget 8GiB --out "$out/capacity") || echo "capacity report failed or timed out"
