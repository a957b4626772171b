"""The workspace's shape: one version everywhere, and imports that go one way only
(kernels -> runtime -> models -> serve / train)."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["vlm_kernels", "vlm_runtime", "vlm_models", "vlm_serve", "vlm_train"]
# What each package may import from the workspace.
ALLOWED = {
    "vlm_kernels": set(),
    "vlm_runtime": {"vlm_kernels"},
    "vlm_models": {"vlm_kernels", "vlm_runtime"},
    "vlm_serve": {"vlm_kernels", "vlm_runtime", "vlm_models"},
    "vlm_train": {"vlm_kernels", "vlm_runtime", "vlm_models"},
}


def source_dir(package: str) -> Path:
    return ROOT / "packages" / package.replace("_", "-") / "src" / package


def workspace_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package: str) -> None:
    for file in source_dir(package).rglob("*.py"):
        bad = workspace_imports(file) - ALLOWED[package] - {package}
        assert not bad, f"{file.relative_to(ROOT)} imports {sorted(bad)}"


def test_one_version_for_all_packages() -> None:
    versions = {
        tomllib.loads(p.read_text())["project"]["version"] for p in (ROOT / "packages").glob("*/pyproject.toml")
    }
    versions.add(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])
    assert len(versions) == 1, versions
    for package in PACKAGES:
        assert importlib.import_module(package).__version__ in versions


def test_no_torch_at_run_time() -> None:
    for package in PACKAGES:
        for file in source_dir(package).rglob("*.py"):
            imported = set()
            for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported.add(node.module.split(".")[0])
            assert not imported & {"torch", "torchvision"}, file
