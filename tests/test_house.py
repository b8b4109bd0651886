"""The house's layering (DESIGN: layout): folders are layers and imports only go down, so a reader
can start at the bottom and never meet a name from above. Read from the source with `ast`, every
import counts, also one inside a function."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's source lies (pyproject's package-dir mapping).
SOURCES = {"progvae": ROOT / "progvae", "progvae.stages": ROOT / "stages",
           "progvae.evaluation": ROOT / "evaluation", "progvae.configs": ROOT / "configs"}
# From the ground up; a module may import from its own layer and the ones below it.
LAYERS = (
    ("core", ("progvae.core", "progvae.configs")),
    ("models and data", ("progvae.models", "progvae.data")),
    ("training", ("progvae.training",)),
    ("runs", ("progvae.runs",)),
    ("codec", ("progvae.codec",)),
    ("stages", ("progvae.stages",)),
    ("evaluation", ("progvae.evaluation",)),
    ("command line and the Python face", ("progvae",)),
)


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == "progvae" and parts and f"progvae.{parts[0]}" in SOURCES:
                continue   # not a real path of the installed package
            modules[name] = path
    return modules


def layer_of(module: str) -> int:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    assert best is not None, module
    return best


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The progvae modules `module` imports (a name imported from a package counts as its
    submodule where there is one)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == "progvae")
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
              f"({LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(import_graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_every_module_sits_in_a_layer_and_no_loose_module_is_left_in_progvae():
    """The top of progvae/ holds only the command line and the Python face; everything else
    lives in the folder that names its layer."""
    loose = sorted(path.name for path in (ROOT / "progvae").glob("*.py"))
    assert set(loose) <= {"__init__.py", "__main__.py", "cli_fire.py"}, loose
    for module in import_graph():
        layer_of(module)


SIDE_EFFECTS = """
import importlib, json, logging, os, sys
before_env = dict(os.environ)
def levels():
    return {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
import torch, torch.utils.cpp_extension, numpy, matplotlib
before_levels = levels()
for name in sys.argv[1:]:
    importlib.import_module(name)
from progvae.models import activations
built = activations.fused_gelu() is not None
after_levels = levels()
changed_levels = {name: [before_levels[name], level] for name, level in after_levels.items()
                  if name in before_levels and before_levels[name] != level}
changed_env = sorted(key for key in set(before_env) | set(os.environ)
                     if before_env.get(key) != os.environ.get(key))
print(json.dumps({"built": built, "levels": changed_levels, "env": changed_env}))
"""


def test_importing_every_module_and_building_the_gelu_operator_leaves_the_process_as_it_was():
    """No process-wide side effects: environment variables and other libraries' loggers are
    the same after importing all of progvae and building its CPU operator."""
    import json
    import subprocess
    import sys

    modules = sorted(name for name in module_files() if name != "progvae.__main__")
    result = subprocess.run([sys.executable, "-c", SIDE_EFFECTS, *modules],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["env"] == [], f"environment variables changed: {report['env']}"
    assert report["levels"] == {}, f"loggers' levels changed: {report['levels']}"


def test_the_python_face_exports_documented_names_and_imports_nothing_heavy():
    """`import progvae` gives the public API lazily: every name in __all__ resolves and is
    documented, and importing the package alone loads neither torch nor the rest of progvae."""
    import subprocess
    import sys

    script = ("import sys, progvae; heavy = [m for m in ('torch', 'progvae.runs', "
              "'progvae.models') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    import progvae

    assert set(progvae.__all__) >= {"load_config", "train", "load_model", "load_pipeline",
                                    "Pipeline", "load_codec", "Codec"}
    for name in progvae.__all__:
        value = getattr(progvae, name)
        assert value.__doc__ and len(value.__doc__.strip()) > 20, f"progvae.{name} is undocumented"
    for method in ("sample", "reconstruct", "elbo"):
        assert getattr(progvae.Pipeline, method).__doc__, f"Pipeline.{method} is undocumented"
    for method in ("compress", "decompress"):
        assert getattr(progvae.Codec, method).__doc__, f"Codec.{method} is undocumented"


def test_the_generated_docs_pages_are_current():
    """docs/configuration.md is generated from the config fields' declarations and
    docs/results.md from docs/results/*.json: a committed page that differs is stale."""
    from progvae.evaluation.docs_pages import pages

    docs = ROOT / "docs"
    for name, text in pages(docs).items():
        assert (docs / name).read_text() == text, (
            f"docs/{name} is stale; regenerate it: python -m progvae.evaluation.docs_pages")


def test_the_readmes_python_example_runs_and_prints_what_the_readme_says(tmp_path):
    """The README's "From Python" example, run as written in a fresh folder: it trains,
    loads, samples, scores and codes through `import progvae` alone."""
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## From Python"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip().splitlines()
    promised = re.findall(r"`([^`]*\d[^`]*)`", " ".join(section[:section.index("## Commands")]
                                                        .split()))
    number = r"-?\d+\.?\d*"
    assert len(printed) == 3
    for line in printed:   # the same words, the same numbers to float noise across CPUs
        match = [text for text in promised
                 if re.sub(number, "#", text) == re.sub(number, "#", line)]
        assert match, f"the README does not show the line {line!r}"
        for got, shown in zip(re.findall(number, line), re.findall(number, match[0])):
            assert float(got) == pytest.approx(float(shown), rel=0.02, abs=2e-3), (line, match)
