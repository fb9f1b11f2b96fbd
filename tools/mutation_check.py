"""Break the algorithm files on purpose, one wrong version at a time, and check that the test suite notices.

Each wrong version (a "mutant") is a text replacement in one algorithm file, listed in `tools/mutants/<file>.toml`:

    [[mutant]]
    name = "online actor uses the ensemble mean"        # what a plausible mistake would look like
    file = "algorithms/so2.py"
    find = "q_pi = critic(obs, action, detach=True).min(dim=0).values"   # must occur exactly once
    replace = "q_pi = critic(obs, action, detach=True).mean(dim=0)"
    tests = ["tests/test_so2_losses.py"]               # what to run (paths or node ids)

For every mutant the harness copies the project into a temporary folder, applies the replacement there (never in the
work tree), checks that the file still compiles, runs `pytest -x` on the mutant's tests and records whether a test
failed (caught) or everything passed (survived), with the first failing test and its message. A `find` that no
longer matches is reported as stale, not counted. Mutants in a shared block apply to every algorithm file that
holds the same text when `file = "*"`, so that tests/test_shared_blocks.py does not catch them for free.

Usage:
    python tools/mutation_check.py                      # every mutant, writes results/mutation_check.md
    python tools/mutation_check.py --only so2 awac      # the mutants of these files
    python tools/mutation_check.py --match "entropy"    # mutants whose name contains this
    python tools/mutation_check.py --jobs 2             # run two mutants at once (one torch thread each)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("algorithms", "tests", "benchmark", "pytest.ini")


@dataclass
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: list[str]
    source: str  # the .toml it came from
    status: str = ""  # caught, survived, stale, broken (does not compile), timeout
    detail: str = ""
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


def load_mutants(only: list[str] | None, match: str | None) -> list[Mutant]:
    mutants = []
    for path in sorted((ROOT / "tools" / "mutants").glob("*.toml")):
        if only and path.stem not in only:
            continue
        for entry in tomllib.loads(path.read_text())["mutant"]:
            missing = {"name", "file", "find", "replace", "tests"} - entry.keys()
            if missing:
                sys.exit(f"error: {path.name}: mutant {entry.get('name')!r} lacks {sorted(missing)}\n")
            if match and match.lower() not in entry["name"].lower():
                continue
            mutants.append(Mutant(entry["name"], entry["file"], entry["find"], entry["replace"], list(entry["tests"]),
                                  path.name))
    return mutants


def first_failure(output: str) -> str:
    """The first failing test id and the line of its assertion message, from pytest -x -q -rf output."""
    failed = re.search(r"^(FAILED|ERROR) (.+?)(?: - (.*))?$", output, re.M)  # test ids may hold spaces
    if failed:
        return f"{failed.group(2)}: {(failed.group(3) or '').strip()[:300]}"
    return output.strip().splitlines()[-1][:300] if output.strip() else "(no output)"


def run_one(m: Mutant, timeout: int) -> Mutant:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        work = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy(src, work / name)
        targets = sorted((work / "algorithms").glob("*.py")) if m.file == "*" else [work / m.file]
        for path in targets:
            text = path.read_text()
            count = text.count(m.find)
            if m.file != "*" and count != 1:
                m.status, m.detail = "stale", f"`find` occurs {count} times in {m.file}"
                return m
            if count:
                path.write_text(text.replace(m.find, m.replace))
                m.files.append(path.name)
                try:
                    py_compile.compile(str(path), doraise=True)
                except py_compile.PyCompileError as e:
                    m.status, m.detail = "broken", f"does not compile: {e.msg.strip().splitlines()[-1]}"
                    return m
        if not m.files:
            m.status, m.detail = "stale", "`find` occurs in no algorithm file"
            return m
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "COLUMNS": "400"}  # pytest fits its summary line (with the message) to the width
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *m.tests]
        try:
            proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            m.status, m.detail = "timeout", f"tests ran past {timeout} s"
        else:
            output = proc.stdout + proc.stderr
            if proc.returncode == 0:
                m.status, m.detail = "survived", "all tests passed"
            elif proc.returncode in (2, 3, 4, 5) or "ERROR collecting" in output:
                # interrupted (a collection error), internal error, usage error, no tests: not a catch
                m.status, m.detail = "broken", f"pytest exit {proc.returncode}: {first_failure(output)}"
            else:
                m.status, m.detail = "caught", first_failure(output)
    m.seconds = time.perf_counter() - t0
    return m


def write_report(mutants: list[Mutant], path: Path, command: str) -> None:
    counted = [m for m in mutants if m.status in ("caught", "survived", "timeout")]
    caught = sum(m.status == "caught" for m in counted)
    lines = [
        "# Mutation check: wrong versions of the algorithm files against the test suite", "",
        f"Generated by `{command}` (tools/mutation_check.py; mutants in tools/mutants/*.toml). Each row is one "
        "deliberate mistake applied to a copy of the project; `caught` means at least one of its tests failed, "
        "and the message column shows the first failure.", "",
        f"**{caught} of {len(counted)} wrong versions caught**"
        + (f"; {len(mutants) - len(counted)} stale or broken (not counted)" if len(counted) < len(mutants) else "")
        + ".", "",
        "| mutant | file | result | first failing test and message | time |",
        "|---|---|---|---|---|",
    ]
    for m in mutants:
        where = ", ".join(m.files) or m.file
        detail = m.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {m.name} | {where} | {m.status} | {detail} | {m.seconds:.0f} s |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutant files to use (stems of tools/mutants/*.toml)")
    parser.add_argument("--match", help="only mutants whose name contains this (case-insensitive)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one mutant's tests may take")
    parser.add_argument("--out", default="results/mutation_check.md", help="report path ('' for none)")
    args = parser.parse_args()
    mutants = load_mutants(args.only, args.match)
    if not mutants:
        sys.exit("error: no mutants selected (see tools/mutants/*.toml)\n")
    print(f"{len(mutants)} mutants", flush=True)
    done = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for m in pool.map(lambda m: run_one(m, args.timeout), mutants):
            done.append(m)
            print(f"[{len(done)}/{len(mutants)}] {m.status:8s} {m.source}: {m.name} ({m.seconds:.0f} s) {m.detail}",
                  flush=True)
    if args.out:
        command = "python tools/mutation_check.py " + " ".join(sys.argv[1:])
        write_report(done, ROOT / args.out, command.strip())
        print(f"wrote {args.out}")
    survived = [m for m in done if m.status in ("survived", "timeout")]
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
