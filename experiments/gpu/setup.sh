# Sourced by the GPU check scripts, from the repo root: makes `import kvcompress` work on a GPU box.
# Uses wheels in .whl/ when present (a GPU box without network: transformers 5.24), and the repo's own package
# laid out as pip installs it when kvcompress is not installed; records the commit for provenance.
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
