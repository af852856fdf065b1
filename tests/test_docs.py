"""The README and docs/ are checked, not trusted: every shell command they show parses with the parser that would run
it (kvcompress's own, or lm-eval's for `kvcompress lm-eval`), every strategy in them parses, every lm-eval task
they name exists, every experiments script they run answers --help, every path they cite exists, the members table
lists every registered member with its real parameters, the headline excerpt matches the results file it is copied
from, and the README's Python example runs. Nothing long runs: commands are parsed, not executed."""

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from kvcompress.evals.config import SMOKE, ReportConfig
from kvcompress.evals.sweep import load_sweep

import kvcompress as kc
from kvcompress.cli import _given, build_parser
from kvcompress.planner import resolve_gpu_memory
from kvcompress.retention import ScoreRetention
from kvcompress.simulator import load_routes
from kvcompress.strategy import AXES, split_strategies

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
GUIDES = ("design", "extending", "evaluation", "serving", "measurements")
SHELLS = ("bash", "sh", "console", "shell")
PROGRAMS = ("kvcompress", "python", "python3", "pip", "pytest", "bash", "sbatch")  # what the docs may run
OUTPUT_FLAGS = ("--out", "--output_path", "--resume", "out:")  # paths a command writes: they need not exist yet
PATH = re.compile(r"(?<![\w.-])(?:results|experiments|tests|docs|kvcompress|kernels|evals)/[\w./*<>-]*")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
HISTORY = re.compile(r"\bv\d+\b|\b(?:until|since|before) (?:this|that|the last) version\b", re.I)


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def blocks(path: Path, *languages: str) -> list[str]:
    """The fenced code blocks of a Markdown file in those languages."""
    return [body for language, body in FENCE.findall(path.read_text()) if language in languages]


def commands(path: Path) -> list[list[str]]:
    """Every shell command of a file's bash/sh/console blocks as argv: continuations joined, comments, `$ ` prompts
    and `VAR=value` prefixes removed, `&&` / `;` / `|` chains split."""
    found = []
    for language, body in FENCE.findall(path.read_text()):
        if language not in SHELLS:
            continue
        lines = body.replace("\\\n", " ").splitlines()
        if language == "console":  # only prompted lines are commands; the rest is their output
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            argv: list[str] = []
            for token in [*shlex.split(line, comments=True), "&&"]:
                if token in ("&&", ";", "|", "||"):
                    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                        argv.pop(0)
                    if argv:
                        found.append(argv)
                    argv = []
                else:
                    argv.append(token)
    return found


def all_commands(program: str | tuple[str, ...]) -> list[tuple[str, list[str]]]:
    programs = (program,) if isinstance(program, str) else program
    return [(_name(doc), argv) for doc in DOCS for argv in commands(doc) if argv[0] in programs]


def _option(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _strategies(value) -> list[str]:
    return split_strategies(value) if isinstance(value, str) else list(value)


# -- the README's shape ----------------------------------------------------------------------------------------------
def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/ (at most 250)"
    text = README.read_text()
    missing = [guide for guide in GUIDES if f"](docs/{guide}.md)" not in text]
    assert not missing, f"README.md links no docs/{missing}.md"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_no_commit_hashes_or_version_history(doc):
    """Numbers are cited from results files by path; commit hashes and version history drift, so prose has neither
    (results/README.md is the index that names commits). Paths are left out of the check: a folder may be named v6."""
    text = re.sub(r"(?:\.\./)?results/[\w./-]*", "", doc.read_text())
    assert not HASH.findall(text), f"{_name(doc)} names commits: {sorted(set(HASH.findall(text)))}"
    history = sorted({m.group(0) for m in HISTORY.finditer(text)})
    assert not history, f"{_name(doc)} tells version history: {history}"


# -- paths and links -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_cited_paths_exist(doc):
    """A path the text cites exists in the tree, except what a command writes (after --out and the like), the
    git-ignored run folders, and `mine`, extending.md's placeholder member."""
    text = doc.read_text()
    missing = []
    for match in PATH.finditer(text):
        path = match.group(0).rstrip(".,:;)*")
        before = text[max(0, match.start() - 16) : match.start()]
        if any(before.rstrip().endswith(flag) or before.endswith(flag + "=") for flag in OUTPUT_FLAGS):
            continue
        if path.startswith("results/runs") or Path(path).stem == "mine" or "<" in path:
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{_name(doc)} cites paths that do not exist: {missing}"
    assert "/results/runs/" in (ROOT / ".gitignore").read_text()  # fresh run folders are never committed


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_links_resolve(doc):
    links = re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
    broken = [
        link
        for link in links
        if not re.match(r"[a-z]+:", link) and not (doc.parent / link.split("#")[0]).resolve().exists()
    ]
    assert not broken, f"{_name(doc)} links to nothing: {broken}"


def test_results_index_lists_every_folder():
    """results/README.md has a row for every committed result (a file's folder or one above it), and every folder
    it lists exists."""
    index = (ROOT / "results" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w./-]+/)`", index, re.M))
    assert all((ROOT / "results" / folder).is_dir() for folder in listed), listed
    unlisted = set()
    for path in (ROOT / "results").rglob("*"):
        relative = path.relative_to(ROOT / "results")
        if path.is_dir() or relative.parts[0] == "runs" or str(relative) == "README.md":
            continue
        ancestors = {"/".join(relative.parts[:i]) + "/" for i in range(1, len(relative.parts))}
        if not ancestors & listed:
            unlisted.add(str(relative.parent) + "/")
    assert not unlisted, f"results/README.md has no row for {sorted(unlisted)}"


# -- commands ----------------------------------------------------------------------------------------------------
def test_every_command_is_one_the_docs_check():
    unknown = [(doc, " ".join(argv)) for doc in DOCS for argv in commands(doc) if argv[0] not in PROGRAMS]
    assert not unknown, f"commands no docs check covers: {unknown}"
    assert all_commands("kvcompress"), "the docs show no kvcompress command: is the block extraction broken?"


@pytest.mark.parametrize(
    "doc, argv",
    [c for c in all_commands("kvcompress") if c[1][1:2] != ["lm-eval"]],
    ids=lambda value: " ".join(value)[:60] if isinstance(value, list) else value,
)
def test_kvcompress_command_parses(doc, argv):
    """The CLI's own parser takes it, its strategies parse, and what the subcommand would validate before any work
    (the report's settings, a sweep file, a routes file, a GPU name) is valid."""
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exit:
        pytest.fail(f"{doc}: `{' '.join(argv)}` does not parse (exit {exit.code})")
    for name in ("strategies", "strategy"):
        if getattr(args, name, None):
            for strategy in _strategies(getattr(args, name)):
                kc.parse_strategy(strategy)
    if args.command == "report" and not args.resume:
        ReportConfig.from_dict({**(SMOKE if args.smoke else {}), **_given(args)})
    if args.command == "sweep":
        load_sweep(ROOT / args.file)
    if args.command == "simulate":
        load_routes(ROOT / args.routes)
    if args.command in ("plan", "simulate"):
        resolve_gpu_memory(args.gpu, args.gpu_mem)


LM_EVAL_COMMANDS = [c for c in all_commands("kvcompress") if c[1][1:2] == ["lm-eval"]]


@pytest.fixture(scope="module")
def lm_eval_known_tasks():
    """The task names of the docs' lm-eval commands that lm-eval's TaskManager knows, ours registered beside its own.
    Indexing all of lm-eval's ~14k task files takes tens of seconds, so a TaskManager first indexes only the folders
    whose files mention a name (a superset of where it can be defined); a name missing there is looked up in the
    full index."""
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the eval and test extras)")
    from kvcompress.evals.lm_eval_recall import TASKS_DIR, task_manager
    from lm_eval.tasks import TaskManager

    names = {task for _, argv in LM_EVAL_COMMANDS for task in (_option(argv, "--tasks") or "").split(",") if task}
    if not names:
        return set()
    word = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(names))) + r")\b")
    tasks_root = Path(sys.modules["lm_eval.tasks"].__file__).parent
    folders = {str(y.parent) for y in tasks_root.rglob("*.yaml") if word.search(y.read_text(errors="ignore"))}
    known = names & set(TaskManager(include_defaults=False, include_path=[*folders, str(TASKS_DIR)]).all_tasks)
    return known if known == names else known | (names & set(task_manager().all_tasks))


@pytest.mark.parametrize(
    "doc, argv",
    LM_EVAL_COMMANDS,
    ids=lambda value: " ".join(value)[:60] if isinstance(value, list) else value,
)
def test_lm_eval_command_parses_and_names_real_tasks(doc, argv, lm_eval_known_tasks):
    """lm-eval's own parser takes it once kvcompress's flags are taken out (as `kvcompress lm-eval` does), its
    strategies parse, its metadata is JSON, and every task it names is one lm-eval's TaskManager knows (ours
    registered beside lm-eval's)."""
    from kvcompress.evals.lm_eval_args import BACKEND_FLAGS, _model_args
    from lm_eval._cli import HarnessCLI

    rest, strategies = argv[2:], _option(argv, "--strategies")
    for flag in ("--strategies", *BACKEND_FLAGS):
        if flag in rest:
            i = rest.index(flag)
            del rest[i : i + 2]
    if rest[:1] != ["run"]:
        rest = ["run", *rest]
    try:
        HarnessCLI()._parser.parse_args(rest)
    except SystemExit as exit:
        pytest.fail(f"{doc}: `{' '.join(argv)}` does not parse with lm-eval's CLI (exit {exit.code})")
    named = [*(split_strategies(strategies) if strategies else [])]
    named += [v for k, v in _model_args(_option(rest, "--model_args") or "").items() if k == "strategy"]
    for strategy in named:
        kc.parse_strategy(strategy)
    if _option(rest, "--metadata"):
        json.loads(_option(rest, "--metadata"))
    tasks = {task for task in (_option(rest, "--tasks") or "").split(",") if task}
    unknown = sorted(tasks - lm_eval_known_tasks)
    assert not unknown, f"{doc}: `{' '.join(argv)}` names tasks lm-eval does not know: {unknown}"


_HELP = """
import json, runpy, sys
codes = {}
for script in sys.argv[1:]:
    sys.argv, sys.path[0] = [script, "--help"], str(__import__("pathlib").Path(script).parent)
    try:
        runpy.run_path(script, run_name="__main__")
        codes[script] = "returned without exiting"
    except SystemExit as exit:
        codes[script] = exit.code or 0
    except Exception as error:
        codes[script] = f"{type(error).__name__}: {error}"
print("\\n" + json.dumps(codes))
"""


def _scripts() -> list[str]:
    return sorted({argv[1] for _, argv in all_commands(("python", "python3")) if argv[1:2]})


@pytest.fixture(scope="module", autouse=True)
def scripts_help(tmp_path_factory):
    """The scripts' --help runs in one process (one torch import), started before this module's first test so that
    it runs beside the others (lm-eval's task index takes a while); each script gets its own folder first on sys.path
    as `python SCRIPT` has it, from the repo root as the docs run them."""
    scripts = [s for s in _scripts() if (ROOT / s).is_file()]
    helper = tmp_path_factory.mktemp("help") / "help.py"
    helper.write_text(_HELP)
    run = subprocess.Popen(
        [sys.executable, str(helper), *scripts], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield scripts, run
    run.kill()
    run.communicate()


def test_experiment_scripts_exist_and_answer_help(scripts_help):
    """Every `python experiments/...` script the docs run exists and answers --help with exit 0."""
    scripts = _scripts()
    assert scripts and all(s.startswith("experiments/") and s.endswith(".py") for s in scripts), scripts
    missing = [s for s in scripts if not (ROOT / s).is_file()]
    assert not missing, f"scripts the docs run do not exist: {missing}"
    ran, run = scripts_help
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-2000:]
    codes = json.loads(stdout.strip().splitlines()[-1])
    assert codes == {s: 0 for s in ran}, codes


def test_install_lines_name_real_extras_and_ci_pins():
    """`pip install -e ".[x]"` names an extra pyproject.toml defines; a pinned install is the one CI runs."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    ci = (ROOT / ".ci" / "run").read_text()
    for doc, argv in all_commands("pip"):
        for arg in argv[2:]:
            for extra in re.findall(r"^\.\[([\w,-]+)\]$", arg):
                assert set(extra.split(",")) <= set(extras), f"{doc}: {arg} names an extra pyproject.toml lacks"
            if "==" in arg:
                assert arg in ci, f"{doc}: pip install {arg} is not what .ci/run installs"


# -- code blocks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_python_blocks_compile(doc):
    for number, block in enumerate(blocks(doc, "python"), 1):
        compile(block, f"{_name(doc)}, python block {number}", "exec")


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_yaml_blocks_are_valid_sweep_files(doc, tmp_path):
    for number, block in enumerate(blocks(doc, "yaml", "yml"), 1):
        path = tmp_path / f"block{number}.yaml"
        path.write_text(block)
        configs, _ = load_sweep(path)
        assert configs and all(c.strategies for c in configs)


@pytest.mark.slow
def test_readme_python_example_runs(capsys, tmp_path, monkeypatch):
    """The README's example as written, on the default model: it generates, the cache holds fewer bytes than a
    full cache of the same tokens (its strategy encodes them), and it saves and loads (in a scratch folder)."""
    monkeypatch.chdir(tmp_path)
    (example,) = blocks(README, "python")
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example, "README.md example", "exec"), namespace)
    assert "KV held:" in capsys.readouterr().out
    cache = namespace["cache"]
    assert cache.get_seq_length() > namespace["inputs"]["input_ids"].shape[1]
    assert 0 < sum(cache.kv_bytes().values()) < namespace["full"]
    assert namespace["on_disk"] == (tmp_path / "chat.kvc").stat().st_size  # the loaded cache is `cache` now


# -- tables copied from the code and the results -----------------------------------------------------------------
def _table_rows(text: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first Markdown table whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return header, rows


def test_members_table_lists_every_registered_member_with_its_parameters():
    """One row per registered member of each axis (a new member without a row fails), its parameters as the
    dataclass declares them with their defaults; the score-based members' shared parameters in the sentence above."""
    text = README.read_text()
    header, rows = _table_rows(text, "axis")
    documented = {}
    for row in rows:
        axis, member = row[0], row[1].strip("`")
        documented[axis, member] = dict(re.findall(r"`(\w+)(?:=([^`]*))?`", row[2]))
    shared = {f.name: f.default for f in dataclasses.fields(ScoreRetention)}
    sentence = next(line for line in text.split("\n\n") if line.startswith("Score-based retentions"))
    assert all(f"`{name}" in sentence for name in shared), sentence
    for axis, registry in AXES.items():
        for name in registry.names():
            cls = registry.get(name)
            assert (axis, name) in documented, f"README.md's members table has no row for {axis} `{name}`"
            fields = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
            own = {k: v for k, v in fields.items() if not (getattr(cls, "seam", False) and k in shared)}
            assert set(documented[axis, name]) == set(own), f"{axis} `{name}`: table {documented[axis, name]}, {own}"
            for key, value in documented[axis, name].items():
                assert value == "" or value == str(own[key]), f"{axis} `{name}`: {key}={value}, default {own[key]}"
    registered = {(axis, name) for axis, registry in AXES.items() for name in registry.names()}
    assert set(documented) == registered, set(documented) - registered


def test_headline_excerpt_matches_the_report_it_is_copied_from():
    """Each cell of the README's excerpt is the start of the same strategy's cell in
    results/default/pressure_transfer.md: regenerating the results without updating the excerpt fails here."""
    source = ROOT / "results" / "default" / "pressure_transfer.md"
    assert "results/default/pressure_transfer.md" in README.read_text()
    header, rows = _table_rows(README.read_text(), "strategy")
    full_header, full_rows = _table_rows(source.read_text(), "strategy")
    by_strategy = {row[0]: dict(zip(full_header, row)) for row in full_rows}
    for row in rows:
        assert row[0] in by_strategy, f"{row[0]} is not a row of {_name(source)}"
        for column, cell in zip(header, row):
            assert by_strategy[row[0]][column].startswith(cell), (
                f"README excerpt, {row[0]} / {column}: {cell!r} is not what {_name(source)} has: "
                f"{by_strategy[row[0]][column]!r}"
            )
