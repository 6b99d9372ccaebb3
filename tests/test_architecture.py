"""Dependencies point one way: cli -> pipelines -> ctsynth_ray; the library never imports ray, mlflow or typer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_LIBRARY = ("ray", "mlflow", "typer", "ctsynth_ray.pipelines", "ctsynth_ray.cli")


def imported_modules(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                yield path, [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, [node.module]


def offending(folder: Path, forbidden) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {name}"
        for path, names in imported_modules(folder)
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_library_imports_no_ray_mlflow_typer_or_upper_layers():
    assert offending(REPO / "ctsynth_ray", FORBIDDEN_IN_LIBRARY) == []


def test_pipelines_do_not_import_the_cli():
    assert offending(REPO / "pipelines", ("typer", "ctsynth_ray.cli")) == []


def test_importing_every_library_module_loads_no_ray_mlflow_typer():
    modules = sorted(
        "ctsynth_ray." + ".".join(p.relative_to(REPO / "ctsynth_ray").with_suffix("").parts)
        for p in (REPO / "ctsynth_ray").rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'mlflow', 'typer')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("bare", ["cli", "pipelines"])
def test_no_bare_top_level_package_is_installed(bare):
    code = f"import importlib.util, os; os.chdir('/'); print(importlib.util.find_spec({bare!r}) is None)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert result.stdout.strip() == "True"
