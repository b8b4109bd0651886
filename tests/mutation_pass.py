"""A mutation-testing pass over the numerical core (not part of the test suite).

Every mutant that mutmut's operators make of a module (a flipped comparison, a changed constant,
a swapped operator, ...) is written over the module in turn and the module's own unit tests run
against it; a mutant the tests do not fail on "survived". Mutants that only change the text of a
message (mutmut wraps string literals in XX) are counted apart, since the tests check messages
by their key words. Prints the score per module and every survivor.

    .venv/bin/pip install mutmut==2.4.5
    .venv/bin/python tests/mutation_pass.py                         # every module below
    .venv/bin/python tests/mutation_pass.py progvae/models/dmol.py  # one of them

It rewrites each module in place while its tests run (and restores it after each mutant), so run
it in a clean clone, not in a tree you are editing. mutmut's own runner is not used: its result
cache fails on this code base ("Attribute Mutant.line is required").
"""

from __future__ import annotations

import difflib
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> the pytest arguments selecting its unit tests
TARGETS = {
    "progvae/training/controllers.py": [
        "tests/test_controllers.py", "-k",
        "not unreachable and not continuing and not other_controllers"],
    "progvae/models/dmol.py": ["tests/test_dmol.py"],
    "progvae/models/distributions.py": [
        "tests/test_model.py", "-k", "kl or merge or ratio or shard or reparameterised"],
    "progvae/runs/heldout.py": [
        "tests/test_evaluation.py", "tests/test_stage2.py", "-k",
        "heldout or importance or log_ratio or monte_carlo"],
    "evaluation/metrics/elbo.py": ["tests/test_evaluation.py", "-k", "importance"],
}


def run_tests(arguments: list[str], timeout: float) -> str:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               *arguments]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if result.returncode == 0 else "killed"


def mutants(source: str, filename: str):
    from mutmut import Context, list_mutations, mutate

    for mutation_id in list_mutations(Context(source=source, filename=filename)):
        mutated, count = mutate(Context(source=source, mutation_id=mutation_id,
                                        filename=filename))
        if count and mutated != source:
            yield mutated


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def mutation_pass(module: str, arguments: list[str]) -> dict:
    path = ROOT / module
    source = path.read_text()
    started = time.perf_counter()
    if run_tests(arguments, timeout=600) != "survived":
        raise SystemExit(f"the tests of {module} fail before any mutation; fix them first")
    timeout = 10 * (time.perf_counter() - started) + 10
    counts = {"killed": 0, "timeout": 0, "survived": 0, "message": 0}
    survivors = []
    try:
        for mutated in mutants(source, module):
            lines = changed_lines(source, mutated)
            if all("XX" in line for line in lines if line.startswith("+")):
                counts["message"] += 1
                continue
            path.write_text(mutated)
            outcome = run_tests(arguments, timeout)
            counts[outcome] += 1
            if outcome == "survived":
                survivors.append(lines)
    finally:
        path.write_text(source)
    tested = counts["killed"] + counts["timeout"] + counts["survived"]
    score = (counts["killed"] + counts["timeout"]) / max(tested, 1)
    print(f"\n{module}: {counts['killed'] + counts['timeout']} of {tested} mutants killed "
          f"({100 * score:.1f}%); {counts['message']} message-text mutants not run; "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    for lines in survivors:
        print("  survived: " + " | ".join(line.strip()[:110] for line in lines), flush=True)
    return {"module": module, "score": score, **counts}


def main(modules: list[str]) -> None:
    for module in modules or list(TARGETS):
        if module not in TARGETS:
            raise SystemExit(f"no unit tests are listed for {module}; choose from "
                             f"{', '.join(TARGETS)}")
        mutation_pass(module, TARGETS[module])


if __name__ == "__main__":
    main(sys.argv[1:])
