"""The blocks every algorithm file shares stay byte-identical, and each file stands alone."""

import ast
import dataclasses
import difflib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "algorithms").glob("*.py"))
# Every file has these; the others (data, ensemble, actor) are compared among the files that have them.
REQUIRED = ("tasks", "normalization", "replay_buffer", "q_diagnostics", "evaluation", "logging", "checkpoint")
MARKER = re.compile(r"^# (>>>|<<<) shared: (\w+)$")


def blocks(path: Path) -> dict[str, str]:
    """Text strictly between the markers of each block; fails on nesting, repeats or unclosed blocks."""
    out, current, lines = {}, None, []
    for n, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        m = MARKER.match(line.rstrip("\n"))
        if not m:
            if current:
                lines.append(line)
            continue
        kind, name = m.groups()
        if kind == ">>>":
            assert current is None, f"{path.name}:{n}: block {name} opens inside block {current}"
            assert name not in out, f"{path.name}:{n}: block {name} appears twice"
            current, lines = name, []
        else:
            assert current == name, f"{path.name}:{n}: closes {name} but {current} is open"
            out[name], current = "".join(lines), None
    assert current is None, f"{path.name}: block {current} is never closed"
    return out


def test_there_are_algorithm_files():
    assert {"so2.py", "sac.py"} <= {p.name for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_required_blocks_present(path):
    missing = [name for name in REQUIRED if name not in blocks(path)]
    assert not missing, f"{path.name} lacks the shared blocks {missing}"


def test_shared_blocks_identical():
    by_file = {p: blocks(p) for p in FILES}
    names = {name for b in by_file.values() for name in b}
    problems = []
    for name in sorted(names):
        having = [(p, b[name]) for p, b in by_file.items() if name in b]
        reference_path, reference = having[0]
        for path, text in having[1:]:
            if text != reference:
                diff = "".join(difflib.unified_diff(reference.splitlines(True), text.splitlines(True),
                                                    f"{reference_path.name}:{name}", f"{path.name}:{name}", n=1))
                problems.append(diff)
    assert not problems, "shared blocks differ (edit one, then run tools/sync_shared.py):\n" + "\n".join(problems)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_project_imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["<relative>"]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in ("algorithms", "benchmark", "tests", "tools", "<relative>"), \
                f"{path.name} imports project code: {name}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_arg_is_used_and_defaults_are_valid(path):
    spec = importlib.util.spec_from_file_location(f"blocks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # importing must have no side effects beyond definitions
    fields = {f.name for f in dataclasses.fields(module.Args)}
    text = path.read_text()
    unused = [f for f in fields if f"args.{f}" not in text and f"{f}=" not in text.split("class Args")[0]]
    assert not unused, f"{path.name}: Args fields never read: {unused}"
    for key, overrides in getattr(module, "DATASET_DEFAULTS", {}).items():
        assert key in module.TASK_IDS or key in module.MUJOCO_FAMILIES + module.ADROIT_FAMILIES, key
        assert set(overrides) <= fields, (key, set(overrides) - fields)


PROTOCOL = ("env_id", "data", "dataset", "seed", "offline_steps", "online_steps", "offline_eval_every", "eval_every",
            "eval_episodes", "q_diag_extend_steps", "output_dir", "checkpoint_every", "log_every", "offline_checkpoint",
            "resume", "device", "threads", "compile", "deterministic", "hidden_dim")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_protocol_fields_come_first_in_the_same_order(path):
    """benchmark/run_all.py passes these flags to every file; sac.py has no offline phase."""
    tree = ast.parse(path.read_text())
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    names = [n.target.id for n in args.body if isinstance(n, ast.AnnAssign)]
    expected = [f for f in PROTOCOL if not (path.name == "sac.py" and f in (
        "dataset", "offline_steps", "offline_eval_every", "offline_checkpoint"))]
    assert names[:len(expected)] == expected, f"{path.name}: {names[:len(expected)]}"
    defaults = {n.target.id: ast.literal_eval(n.value) for n in args.body
                if isinstance(n, ast.AnnAssign) and n.target.id == "hidden_dim"}
    assert defaults == {"hidden_dim": 256}
