"""The repo's layout: its top-level kernels/ and evals/ folders ship as kvcompress.kernels and kvcompress.evals and
never stand in for the PyPI packages named `kernels` and `evals`, wherever Python starts."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_in_root(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
def test_python_started_in_the_repo_root_loads_the_default_model():
    """`python -c` in the repo root puts the root first on sys.path; transformers' `import kernels` must still get the
    installed package, and the model load and a generation must work."""
    script = (
        "import kernels, kvcompress as kc\n"
        "model, tokenizer = kc.load_model('default', dtype='float32')\n"
        "ids = tokenizer('The capital of France is', return_tensors='pt').input_ids\n"
        "cache = kc.make_cache(model, 'sink:window=60+int8')\n"
        "out = model.generate(ids, max_new_tokens=3, do_sample=False, cache=cache)\n"
        "print(kernels.__file__)\n"
        "print(kc.kernels.__file__)\n"
        "print(out.shape[1] - ids.shape[1])\n"
    )
    for args, stdin in ((("-c", script), None), (("-",), script)):
        run = _python_in_root(*args, stdin=stdin)
        assert run.returncode == 0, run.stderr[-3000:]
        installed, ours, new_tokens = run.stdout.split()[-3:]
        assert not Path(installed).resolve().is_relative_to(ROOT), installed
        assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
        assert new_tokens == "3"


def test_top_level_evals_in_the_repo_root_is_not_the_folder():
    """No `evals` package is installed here: found from the repo root, the folder refuses rather than pose as one."""
    run = _python_in_root("-c", "import evals")
    assert run.returncode != 0
    assert "No module named 'evals' (the repo folder evals/ is kvcompress.evals)" in run.stderr


def test_python_m_pytest_in_the_repo_root_collects_with_the_installed_kernels():
    """`python -m pytest` also starts with the repo root on sys.path; a test module that imports transformers'
    integration of `kernels` collects and sees the installed package."""
    run = _python_in_root(
        "-c",
        "import sys, kernels, transformers.integrations.hub_kernels as hub; "
        "from kvcompress.kernels import pack_nibbles; "
        "print(kernels.__file__); print(hasattr(kernels, 'CUDAProperties'))",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    installed, has_cuda_properties = run.stdout.split()[-2:]
    assert not Path(installed).resolve().is_relative_to(ROOT)
    assert has_cuda_properties == "True"
    collected = _python_in_root("-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", "tests/test_strategy.py")
    assert collected.returncode == 0, collected.stdout[-3000:]
    assert " tests collected" in collected.stdout or " test collected" in collected.stdout
