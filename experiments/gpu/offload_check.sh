#!/usr/bin/env bash
# Issue 4's GPU check of the offload tiers: one script, under 5 minutes on one H100/H200.
#
#   bash experiments/gpu/offload_check.sh [OUT_DIR] [offload_check.py options]    (OUT_DIR defaults to results/gpu)
#
# setup.sh makes kvcompress importable there (.whl/ wheels, or the repo laid out as pip installs it). Writes OUT_DIR/offload.json and offload.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-results/gpu}
shift || true
source experiments/gpu/setup.sh
PYTHONUNBUFFERED=1 python3 experiments/gpu/offload_check.py --out "$out" "$@"
