"""The package's shape: the core never imports a study, and no module is too long to read in one sitting."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dvlib

PACKAGE = Path(dvlib.__file__).parent
CORE = sorted(p for p in PACKAGE.rglob("*.py") if "studies" not in p.relative_to(PACKAGE).parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` in ``path`` names, function-local ones included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from dvlib import studies
    return names


def test_core_never_imports_a_study():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p) if m.startswith("dvlib.studies"))
                 for p in CORE}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_check_sees_a_study_import(tmp_path):
    # the rule above must catch both spellings, at module level and inside a function
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from dvlib import studies\n    import dvlib.studies.federated.steps\n")
    assert {"dvlib.studies", "dvlib.studies.federated.steps"} <= imported_modules(f)


def test_importing_the_core_loads_no_study():
    # what a hospital or the paper's notebooks import; a study loaded on the way would show in sys.modules
    code = ("import sys, dvlib, dvlib.cli, dvlib.experiment, dvlib.reporting, dvlib.site, dvlib.coordinator\n"
            "print(sorted(m for m in sys.modules if m.startswith('dvlib.studies')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
