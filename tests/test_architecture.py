"""The layout's rules, checked on the source tree: a pure core, unique module names, documented layout."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attncomm"
FORBIDDEN_IN_CORE = ("hydra", "omegaconf", "wandb", "h5py", "yaml")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[str]:
    """Every module name imported by ``path`` (top level and inside functions or TYPE_CHECKING)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.append("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_nothing_outside_core(path: Path) -> None:
    bad = []
    for name in _imports(path):
        root = name.split(".")[0]
        if name.startswith("."):
            bad.append(name)  # relative imports could escape core; the package uses absolute ones
        elif root == "attncomm" and not (name == "attncomm.core" or name.startswith("attncomm.core.")):
            bad.append(name)
        elif root in FORBIDDEN_IN_CORE:
            bad.append(name)
    assert not bad, f"attncomm/core/{path.name} imports {bad}: core must import only core, torch & co."


def test_the_core_import_check_catches_a_violation(tmp_path: Path) -> None:
    fake = tmp_path / "bad.py"
    fake.write_text("import h5py\nfrom attncomm.io.results import FiringRecord\n")
    assert _imports(fake) == ["h5py", "attncomm.io.results"]


def test_no_two_modules_share_a_stem() -> None:
    stems: dict[str, list[str]] = {}
    for path in _modules():
        if path.name == "__init__.py":
            continue
        stems.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE.parent)))
    clashes = {stem: paths for stem, paths in stems.items() if len(paths) > 1}
    assert not clashes, f"modules sharing a name: {clashes}"


def _documented_modules(design: str) -> set[str]:
    """Module paths listed in the layout block of docs/DESIGN.md (paths relative to ``attncomm/``)."""
    block = design.split("<!-- layout:start -->")[1].split("<!-- layout:end -->")[0]
    package_part = block.split("\nattncomm/\n")[1].split("\ntests/")[0]
    return {f"attncomm/{name}" for name in re.findall(r"(?<![\w/.])(?:\w+/)*\w+\.py\b", package_part)}


def test_design_doc_lists_every_module_and_nothing_else() -> None:
    design = (PACKAGE.parent / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    documented = _documented_modules(design)
    actual = {str(p.relative_to(PACKAGE.parent)) for p in _modules() if p.name != "__init__.py"}
    assert not actual - documented, (
        f"modules missing from docs/DESIGN.md's layout: {sorted(actual - documented)}"
    )
    assert not documented - actual, (
        f"docs/DESIGN.md lists modules that do not exist: {sorted(documented - actual)}"
    )


def test_docs_stand_alone() -> None:
    """No document or docstring of the repository points at files a user of the repository lacks."""
    root = PACKAGE.parent
    texts = [*root.glob("*.md"), *(root / "docs").glob("*.md"), *_modules(), *(root / "conf").rglob("*.yaml")]
    offenders = [
        str(p.relative_to(root))
        for p in texts
        if re.search(r"ACC-METHOD|\.\./shared/(?!reference)|shared/DESIGN", p.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"these files point outside the repository: {offenders}"
