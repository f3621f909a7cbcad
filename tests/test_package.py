"""The `pogdiff` package stands alone: it imports no root-level script, and `pip install .` gives a working package.

The root-level scripts (train_pogdiff.py, evaluate_pogdiff.py, pipeline_pogdiff.py) import `pogdiff`, never the
other way round: an installed `pogdiff` has no repository next to it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from pogdiff.testing import run_process_group

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pogdiff"

# What must not reach the copy that is built: ignored by .gitignore, large (outputs/) or build leftovers.
_NOT_COPIED = {".git", ".venv", ".whl", "outputs", "runs", "build", "dist", ".pytest_cache", ".ruff_cache"}


def _root_level_modules() -> set[str]:
    """Top-level import names that only exist inside the repository: root scripts and non-package folders."""
    scripts = {p.stem for p in REPO.glob("*.py")}
    folders = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return (scripts | folders | {"train_pogdiff", "evaluate_pogdiff", "pipeline_pogdiff"}) - {"pogdiff"}


def _package_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imported_top_level_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _mutates_sys_path(tree: ast.AST) -> bool:
    """`sys.path.insert(...)` / `.append(...)` / `.extend(...)`, `sys.path = ...` or `sys.path += ...`."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"insert", "append", "extend"}
            and ast.unparse(node.func.value) == "sys.path"
        ):
            return True
        if isinstance(node, ast.Assign) and any(ast.unparse(t) == "sys.path" for t in node.targets):
            return True
        if isinstance(node, ast.AugAssign) and ast.unparse(node.target) == "sys.path":
            return True
    return False


def test_package_imports_no_root_level_module():
    forbidden = _root_level_modules()
    offenders = {}
    for source in _package_sources():
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        bad = sorted(_imported_top_level_names(tree) & forbidden)
        if bad:
            offenders[str(source.relative_to(REPO))] = bad
    assert not offenders, (
        f"pogdiff modules import root-level scripts (move the code into pogdiff/): {offenders}"
    )


def test_package_does_not_edit_sys_path():
    offenders = [
        str(source.relative_to(REPO))
        for source in _package_sources()
        if _mutates_sys_path(ast.parse(source.read_text(encoding="utf-8"), filename=str(source)))
    ]
    assert not offenders, f"pogdiff modules edit sys.path (a package imports by its own name): {offenders}"


def _setuptools_version() -> tuple[int, ...] | None:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


# Imports every installed pogdiff module (found from the installed package, not from the repository) and
# reports where they came from; a root-level script must not be importable there.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import pogdiff, pogdiff.testing
names = sorted(m.name for m in pkgutil.walk_packages(pogdiff.__path__, "pogdiff."))
files = {name: importlib.import_module(name).__file__ for name in names}
root = {}
for script in ("train_pogdiff", "evaluate_pogdiff", "pipeline_pogdiff"):
    try:
        importlib.import_module(script)
        root[script] = "imported"
    except ModuleNotFoundError as error:
        root[script] = error.name
print(json.dumps({"package": pogdiff.__file__, "modules": files, "root": root}))
"""


def test_pip_install_gives_a_standalone_package(tmp_path):
    """`pip install .` (no deps, offline) into a target folder, then import every module from there alone."""
    setuptools_version = _setuptools_version()
    if setuptools_version is None or setuptools_version < (77,):
        pytest.skip(f"needs setuptools>=77 in this environment to build offline (found {setuptools_version})")

    # Build from a copy: an in-tree build would leave build/ and pogdiff.egg-info/ in the repository.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=lambda folder, names: [
            n
            for n in names
            if n == "__pycache__" or n.endswith(".egg-info") or (Path(folder) == REPO and n in _NOT_COPIED)
        ],
    )
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    pip += ["--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)]
    done = run_process_group(pip, timeout=180)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"

    installed = sorted(
        p.relative_to(target).as_posix()
        for p in (target / "pogdiff").rglob("*.py")
        if "__pycache__" not in p.parts
    )
    expected = sorted(p.relative_to(REPO).as_posix() for p in _package_sources())
    assert installed == expected, "the wheel must hold every pogdiff/ source file (and only those)"
    assert not any((target / f"{name}.py").exists() for name in _root_level_modules())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONNOUSERSITE="1")
    done = run_process_group([sys.executable, "-c", _IMPORT_ALL], timeout=180, cwd=elsewhere, env=env)
    assert done.returncode == 0, f"importing the installed package failed:\n{done.stdout}\n{done.stderr}"

    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).resolve().is_relative_to(target.resolve())
    modules = {".".join(Path(name).with_suffix("").parts).removesuffix(".__init__") for name in expected}
    assert set(report["modules"]) == modules - {"pogdiff"}
    for name, file in report["modules"].items():
        assert Path(file).resolve().is_relative_to(target.resolve()), (
            f"{name} came from {file}, not the install"
        )
    assert report["root"] == {
        name: name for name in ("train_pogdiff", "evaluate_pogdiff", "pipeline_pogdiff")
    }


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: code that runs as the module `__main__` (`python -m pogdiff.X`), a script at
    the top of the graph, not as the module `pogdiff.X` that others import."""
    return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'


def _pogdiff_imports(source: Path) -> set[str]:
    """The pogdiff modules `source` imports anywhere (module level or inside functions), outside its main block."""
    package = ".".join(source.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        # A main block runs as `__main__`; a TYPE_CHECKING block never runs: neither is an import at run time.
        if _is_main_block(node) or (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source.read_text(encoding="utf-8"), filename=str(source)))
    return found


def _pogdiff_import_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in _package_sources()}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    return {
        name: (_pogdiff_imports(path) & set(modules)) - {name, "pogdiff"} for name, path in modules.items()
    }


def test_pogdiff_modules_import_each_other_without_a_cycle():
    graph = _pogdiff_import_graph()
    assert (
        "pogdiff.index" in graph and "pogdiff.arguments" in graph["pogdiff.index"]
    )  # the walk sees lazy imports
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(
                f"import cycle among pogdiff modules: {' -> '.join([*path[path.index(name) :], name])}"
            )
        if name in done:
            return
        for imported in sorted(graph[name]):
            walk(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])


def test_the_index_library_does_not_load_the_command_line_modules():
    """The cached neighbour table (`pogdiff.index` as a library) must not depend on the CLI's flag module or on the
    training step: `python -m pogdiff.index` loads those inside parse_args / main."""
    code = "import json, sys, pogdiff.index; print(json.dumps(sorted(m for m in sys.modules if m.startswith('pogdiff'))))"
    done = run_process_group([sys.executable, "-c", code], timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "pogdiff.index" in loaded
    assert not loaded & {"pogdiff.arguments", "pogdiff.training", "pogdiff.checkpointing", "pogdiff.hub"}, (
        loaded
    )
