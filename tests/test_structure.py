"""The code's shape (shared/STYLE.md): no import circle, modules of a readable size, a
``train()`` that reads in one sitting, and packaging that declares what sdtune imports
and ships what it reads at run time."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "sdtune"
MAX_MODULE_LINES = 500
MAX_TRAIN_LINES = 150


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if path.is_symlink() or any(part.startswith(".") for part in path.parts):
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> list[str]:
    """Every module an import statement anywhere in the file names (functions' lazy ones too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_no_import_circle_in_the_package():
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ is imported by its own modules' imports; that is not a circle of ours.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [name, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_modules_stay_readable():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
    tree = ast.parse((PACKAGE / "train.py").read_text(encoding="utf-8"))
    (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 < MAX_TRAIN_LINES


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip() for r in requirements}
    return {n.lower().replace("_", "-") for n in names}


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    third_party = set()
    for path in _modules().values():
        for name in _imports(path):
            top = name.split(".")[0]
            if top != "sdtune" and top not in sys.stdlib_module_names:
                third_party.add(top)
    undeclared = {
        top: distributions.get(top) for top in third_party
        if not {d.lower().replace("_", "-") for d in distributions.get(top, [top])} & _declared()
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_wheel_ships_what_runs_need(tmp_path):
    """A non-editable install has the demo recipe `sdtune train` defaults to, the model
    configs and the tokenizer files, and reads them from the package."""
    source = tmp_path / "src"  # a copy, so the build leaves the checkout clean
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "recipes"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "sdtune", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sdtune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"sdtune/recipes/{recipe.name}" in names
    assert {"sdtune/configs/sd_v1.json", "sdtune/configs/sd_v2.json", "sdtune/clip_bpe/vocab.json", "sdtune/clip_bpe/merges.txt"} <= names
    check = (
        "import sdtune, sdtune.train as t; from sdtune.recipe import load_recipe; from sdtune.tiny import clip_tokenizer; "
        "assert sdtune.__file__.startswith(%r), sdtune.__file__; "
        "assert load_recipe(t.DEMO_RECIPE).output.name == 'tiny-demo'; assert clip_tokenizer()('a')['input_ids'][0] == 49406"
    ) % str(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]


# Run as `accelerate launch sdtune/train.py`: records, at the first import of a library that
# logs notices at import, whether sdtune (whose __init__ quiets those loggers) was loaded.
FIRST_LIBRARY_PROBE = """
import runpy, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "diffusers", "transformers", "peft", "bitsandbytes") and not seen:
            seen.append((name, "sdtune" in sys.modules))
sys.meta_path.insert(0, Watch())
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(seen)
"""


def test_train_run_as_a_file_quiets_the_libraries_before_it_imports_them():
    """A file run imports sdtune/__init__ only when train.py says so: it must come before torch and
    diffusers, or bitsandbytes (imported by diffusers where installed) logs, on a CPU with
    AVX512-BF16, its failed kernel download into every run's output."""
    run = subprocess.run([sys.executable, "-c", FIRST_LIBRARY_PROBE, str(PACKAGE / "train.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[('torch', True)]", run.stdout[-2000:]
