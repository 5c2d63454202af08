"""No script shadows a package the scripts import: a script's folder comes first on ``sys.path``."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_script_is_named_like_an_installed_package():
    clashes = [p.name for p in (ROOT / "scripts").glob("*.py") if importlib.util.find_spec(p.stem) is not None
               and not str(importlib.util.find_spec(p.stem).origin or "").startswith(str(ROOT / "scripts"))]
    assert not clashes, f"scripts named like installed packages (rename them): {clashes}"
