"""The architecture in pyproject.toml ([tool.importlinter]) holds, and each contract can fail.

``lint-imports`` checks that ``retrieval`` never imports ``pipelines``, that its modules sit
in layers, and that no package of ``retrieval`` has import cycles between its children. Two
things it does not see are checked here with its graph library (grimp): a cycle between a
package's ``__init__`` and its own modules, and private names imported from another module.
"""

from __future__ import annotations

import ast
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "pipelines", "schemas")
# The console script next to this interpreter (the project's venv), else the one on PATH.
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which(
    "lint-imports"
)


def lint_imports(root: Path, *contract_ids: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the project at ``root`` (its packages and pyproject.toml)."""
    assert LINT_IMPORTS, "lint-imports is not installed (pip install -e '.[test]')"
    contracts = [arg for contract in contract_ids for arg in ("--contract", contract)]
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo", *contracts],
        cwd=root,
        # Only root's packages are importable under their names, so only they are analysed;
        # COLUMNS keeps rich from wrapping the report that a failure shows.
        env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_project_keeps_its_import_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The packages and pyproject.toml copied, checked to keep every contract as they are."""
    root = tmp_path_factory.mktemp("project")
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO / "pyproject.toml", root)
    result = lint_imports(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


# (module of the copy, code appended to it or written as a new module, contract that breaks)
BREAKAGES = {
    "retrieval imports pipelines": (
        "retrieval/images.py",
        "import pipelines.config\n",
        "retrieval-runner-agnostic",
    ),
    "schemas imports retrieval": (
        "schemas/__init__.py",
        "import retrieval.redaction\n",
        "schemas-at-the-bottom",
    ),
    "a lower layer imports a higher one": (
        "retrieval/redaction.py",
        "import retrieval.images\n",
        "retrieval-layers",
    ),
    "independent modules of one layer import each other": (
        "retrieval/images.py",
        "from retrieval.image_refs import ImageRef\n",
        "retrieval-layers",
    ),
    "an import inside a function counts": (
        "retrieval/storage.py",
        "def _late():\n    from retrieval import corpus\n",
        "retrieval-layers",
    ),
    "a new module is given no layer": (
        "retrieval/unplaced.py",
        "import retrieval.storage\n",
        "retrieval-layers",
    ),
    "one local-feature extractor imports another": (
        "retrieval/local_features/rootsift.py",
        "from retrieval.local_features import delf_hub\n",
        "local-features-layers",
    ),
    # index/ has no layers contract: only the acyclic one sees this (search imports merge).
    "a cycle inside a subpackage": (
        "retrieval/index/merge.py",
        "def _late():\n    from retrieval.index import search\n",
        "retrieval-acyclic",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_contract_breaks_when_its_rule_is_broken(project_copy, tmp_path, breakage):
    module, code, contract = BREAKAGES[breakage]
    root = tmp_path / "project"
    shutil.copytree(project_copy, root)
    with open(root / module, "a", encoding="utf-8") as f:
        f.write("\n" + code)
    result = lint_imports(root, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 broken" in result.stdout


def import_cycles(graph: grimp.ImportGraph, package: str) -> list[tuple[str, ...]]:
    """Every direct import inside ``package`` that a chain of imports leads back from, as the
    cycle it closes (importer first). Sees a package's ``__init__`` like any other module."""
    modules = graph.find_descendants(package) | {package}
    cycles = []
    for module in sorted(modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module) & modules):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append((module, *back))
    return cycles


@pytest.fixture(scope="module")
def retrieval_graph() -> grimp.ImportGraph:
    return grimp.build_graph("retrieval", cache_dir=None)


def test_no_module_of_retrieval_is_in_an_import_cycle(retrieval_graph):
    assert import_cycles(retrieval_graph, "retrieval") == []


def test_a_cycle_through_a_package_init_is_found(retrieval_graph):
    # The acyclic_siblings contract compares a package's children, not the package itself:
    # an engine importing the runtimes package, whose __init__ imports the engines, is found
    # only here.
    graph = copy.deepcopy(retrieval_graph)
    graph.add_import(importer="retrieval.runtimes.tflite", imported="retrieval.runtimes")
    assert ("retrieval.runtimes", "retrieval.runtimes.tflite", "retrieval.runtimes") in (
        import_cycles(graph, "retrieval")
    )


def private_names_imported(source: str) -> list[str]:
    """Names starting with one underscore that ``source`` imports from the project's packages."""
    return [
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_retrieval_imports_no_private_names_from_other_modules():
    found = {
        str(path.relative_to(REPO)): names
        for path in sorted((REPO / "retrieval").rglob("*.py"))
        if (names := private_names_imported(path.read_text(encoding="utf-8")))
    }
    assert found == {}


def test_a_private_name_import_is_found():
    source = "def f():\n    from retrieval.local_features.rootsift import _to_side, shrink\n"
    assert private_names_imported(source) == ["_to_side"]
