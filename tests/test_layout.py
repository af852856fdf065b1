"""The repo's layout: its top-level kernels/ and evals/ folders ship as kvcompress.kernels and kvcompress.evals and
never stand in for the PyPI packages named `kernels` and `evals`, wherever Python starts."""

import ast
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
    collected = _python_in_root(
        "-m", "pytest", "-q", "--co", "-n", "0", "-p", "no:cacheprovider", "tests/test_strategy.py"
    )
    assert collected.returncode == 0, collected.stdout[-3000:]
    assert " tests collected" in collected.stdout or " test collected" in collected.stdout


# where each of the project's packages lives in the repo (pyproject.toml maps the same folders)
PACKAGES = {
    "kvcompress": ROOT / "kvcompress",
    "kvcompress.kernels": ROOT / "kernels",
    "kvcompress.evals": ROOT / "evals",
}
# imported inside functions on purpose: optional dependencies (the eval extra's lm-eval) behind a lazy import
LAZY = {("kvcompress.cli", "kvcompress.evals.lm_eval")}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module-level import edges between the project's modules, and its imports made inside functions."""
    edges, local = {}, []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        in_function = {
            id(node)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(f)
        }
        edges[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in (n for n in names if n in modules and n != module):
                if id(node) in in_function:
                    local.append((module, name, node.lineno))
                else:
                    edges[module].add(name)
    return edges, local


def test_no_import_circles_and_no_function_local_imports_of_our_own_modules():
    """A circle dodged by an import inside a function means a function lives in the wrong file."""
    edges, local = _imports(_modules())
    assert [(m, n, line) for m, n, line in local if (m, n) not in LAZY] == []

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    # a package's __init__ importing its submodules, which import names back from it, is Python's own layering
    circles = sorted((m, n) for m in edges for n in edges[m] if m in reach(n) and not n.startswith(m + ".") and m != n)
    circles = [(m, n) for m, n in circles if not (m.startswith(n + ".") or n.startswith(m + "."))]
    assert circles == []


def test_the_import_check_sees_a_circle_and_a_local_import(tmp_path, monkeypatch):
    """The check itself: a planted circle and a function-local import are both found."""
    (tmp_path / "a.py").write_text("from . import b\n\ndef f():\n    from . import c\n")
    (tmp_path / "b.py").write_text("from .a import f\n")
    (tmp_path / "c.py").write_text("")
    (tmp_path / "__init__.py").write_text("")
    monkeypatch.setitem(PACKAGES, "planted", tmp_path)
    edges, local = _imports({k: v for k, v in _modules().items() if k.startswith("planted")})
    assert edges["planted.a"] == {"planted.b"} and edges["planted.b"] == {"planted.a"}
    assert local == [("planted.a", "planted.c", 4)]
