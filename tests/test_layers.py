"""The package layout's rules, read from the code's own imports (ast, nothing is imported or run):

* no import circle between modules;
* every import points down the layers below (a module may import its own layer and the ones under it);
* the applications under utils/apps/ never import each other;
* library modules carry no ``sys.path`` edits (only the entry scripts may: train.py, benchmarks/, the CLIs).

Layers, bottom first::

    0  utils.core          io, config, errors, device: no torch model code, nothing of the project above
    1  models              cameras, geometry, FLAME, Gaussians, renderers, the identity field, posing, encoder
    2  utils.data, utils.losses, utils.fused_ssim        data files, datasets, model.pt / code.pt, synthetic data
    3  utils.face, utils.motion, utils.evaluation, utils.identity    libraries the applications share
    4  utils.apps.<app>    train, track, animate, interpolate, viewer
    5  utils.preprocess, utils.make_synthetic_dataset, the entry scripts, benchmarks
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "utils", "benchmarks")
ENTRY_SCRIPTS = ("train.py", "track.py", "animate.py", "interpolate.py", "viewer.py")

LAYERS = (  # (module prefix, layer); the longest matching prefix wins
    ("utils", 0), ("utils.core", 0),
    ("models", 1),
    ("utils.data", 2), ("utils.losses", 2), ("utils.fused_ssim", 2),
    ("utils.face", 3), ("utils.motion", 3), ("utils.evaluation", 3), ("utils.identity", 3),
    ("utils.apps", 4),
    ("utils.preprocess", 5), ("utils.make_synthetic_dataset", 5), ("benchmarks", 5), ("__main__", 5),
)


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of the packages and the entry scripts (entry scripts are named by file)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    for name in ENTRY_SCRIPTS:
        out[f"__main__.{name[:-3]}"] = REPO / name
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (module level, functions, TYPE_CHECKING blocks).
    ``from package import submodule`` counts as an import of the submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer_of(name: str) -> int:
    best = max((p for p, _ in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"module {name} belongs to no layer: add it to tests/test_layers.py LAYERS"
    return dict(LAYERS)[best]


def app_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["utils", "apps"] else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_import_circle(graph):
    # Tarjan's strongly connected components; any component of 2+ modules is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_imports_point_down(graph):
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_applications_do_not_import_each_other(graph):
    crossing = [f"{a} imports {b}" for a, deps in graph.items() for b in deps
                if app_of(a) and app_of(b) and app_of(a) != app_of(b)]
    assert not crossing, "applications importing each other:\n" + "\n".join(sorted(crossing))


def test_models_import_only_core(graph):
    bad = [f"{a} imports {b}" for a, deps in graph.items() if a.startswith("models")
           for b in deps if not (b.startswith("models") or b.startswith("utils.core"))]
    assert not bad, "\n".join(sorted(bad))


def test_no_sys_path_edits_in_library_modules():
    entry = {"utils/make_synthetic_dataset.py"}  # a command-line script kept at its documented path
    bad = []
    for pkg in ("models", "utils"):
        for f in (REPO / pkg).rglob("*.py"):
            rel = f.relative_to(REPO).as_posix()
            cli = rel.startswith("utils/preprocess/") and f.name not in ("common.py", "__init__.py")
            if rel in entry or cli:
                continue  # the preprocessing CLIs are entry scripts run by path
            text = f.read_text(encoding="utf-8")
            if "sys.path.insert" in text or "sys.path.append" in text:
                bad.append(rel)
    assert not bad, f"library modules that edit sys.path: {bad}"


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    """The walk itself works: an import of an application from models/ is reported as pointing up."""
    planted = tmp_path / "planted.py"
    planted.write_text("from utils.apps.track.fit import fit_identity\nfrom models import camera\n")
    modules = module_files()
    deps = imports_of("models.planted", planted, modules)
    assert deps == {"utils.apps.track.fit", "models.camera"}
    assert max(layer_of(d) for d in deps) > layer_of("models.planted")


def test_ruff_check_passes():
    """The whole repository passes ruff with pyproject.toml's rules (pycodestyle, pyflakes, import order; 120
    columns); ruff comes with requirements-dev.txt."""
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                         text=True, cwd=REPO)
    assert run.returncode == 0, f"ruff check found problems (fix them or run `python3 -m ruff check --fix .`):\n" \
                                f"{run.stdout[-6000:]}{run.stderr[-2000:]}"
