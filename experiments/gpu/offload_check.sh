#!/usr/bin/env bash
# Issue 4's GPU check of the offload tiers: one script, under 5 minutes on one H100/H200.
#
#   bash experiments/gpu/offload_check.sh [OUT_DIR] [offload_check.py options]    (OUT_DIR defaults to results/gpu)
#
# Uses wheels in .whl/ when present (a GPU box without network: transformers 5.24), and the repo's own package
# laid out as pip installs it when kvcompress is not installed. Writes OUT_DIR/offload.json and offload.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-results/gpu}
shift || true
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvc-site .whl/*.whl
  export PYTHONPATH=/tmp/kvc-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! (cd /tmp && python3 -c "import kvcompress.kernels" 2>/dev/null); then
  rm -rf /tmp/kvc-pkg && mkdir -p /tmp/kvc-pkg
  cp -r kvcompress /tmp/kvc-pkg/ && cp -r kernels /tmp/kvc-pkg/kvcompress/kernels && cp -r evals /tmp/kvc-pkg/kvcompress/evals
  export PYTHONPATH=/tmp/kvc-pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export KVCOMPRESS_GIT_COMMIT=${KVCOMPRESS_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
PYTHONUNBUFFERED=1 python3 experiments/gpu/offload_check.py --out "$out" "$@"
