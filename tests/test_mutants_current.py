"""tools/mutants/*.toml stays in step with the code: every wrong version's `find` text still occurs in its file
(exactly once, or somewhere for a shared `*` mutant) and every test it names exists. A mutant whose text no longer
matches is reported as stale by tools/mutation_check.py and silently stops testing anything; this catches it at
once, without running the mutants."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tools_mutation_check", ROOT / "tools" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mutation_check
spec.loader.exec_module(mutation_check)


def test_every_mutant_still_applies_and_names_existing_tests():
    mutants = mutation_check.load_mutants(None, None)
    assert len(mutants) > 200
    problems = []
    for m in mutants:
        files = sorted((ROOT / "algorithms").glob("*.py")) if m.file == "*" else [ROOT / m.file]
        counts = [f.read_text().count(m.find) if f.is_file() else 0 for f in files]
        if (sum(counts) == 0) if m.file == "*" else counts != [1]:
            problems.append(f"{m.source}: {m.name!r}: `find` occurs {sum(counts)} times in {m.file}")
        for test in m.tests:
            path, _, name = test.partition("::")
            if not (ROOT / path).is_file():
                problems.append(f"{m.source}: {m.name!r}: no test file {path}")
            elif name:
                defined = {n.name for n in ast.walk(ast.parse((ROOT / path).read_text()))
                           if isinstance(n, ast.FunctionDef)}
                if name.split("[")[0] not in defined:
                    problems.append(f"{m.source}: {m.name!r}: no test {name} in {path}")
    assert not problems, "\n".join(problems)
