"""The scripts under ``bench/`` as modules, for the tests that check what they compute (they are scripts, not a
package, so they are loaded from their files)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str, register: bool = False) -> ModuleType:
    """``bench/<name>.py`` as a module; ``register`` also puts it in ``sys.modules`` under ``name``, so that its
    multiprocessing workers can pickle its functions by name."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
