"""highdicom's table of every DICOM module's attributes, read one module at a time.

highdicom 0.28 reads ``_standard/module_attribute_map.json`` (22 MB, 436 modules) whole into Python lists and
dicts the first time it copies a source's Patient and Study modules (every SC and SR we build) and keeps it
for the life of the process: about 75 MB more resident memory in a worker from its first report on
(measured for issue #9), to look up the handful of modules of one or two IODs.

:func:`install` swaps highdicom's cached loader for one that indexes where each module's list starts in that
file and parses a module when it is first asked for (then keeps it). The values are those of highdicom's own
loader (a test compares every module). If highdicom's file or loader is not where this expects, nothing is
changed and highdicom keeps its own; if the file is not laid out as expected, it is parsed whole, as highdicom
would.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TABLE = "_standard/module_attribute_map.json"
#: highdicom's modules that imported the loader by name (``from ._standard_utils import ...``).
USERS = ("highdicom._standard_utils", "highdicom.base", "highdicom.image")
_KEY = re.compile(rb'^  "([^"\\]+)": \[', re.MULTILINE)  # a top-level key: the file is indented by two


class ModuleAttributeMap(Mapping[str, list[dict[str, Any]]]):
    """Module key (``"general-series"``) -> attribute list, parsed from ``path`` on first access.

    The file is first read when a module is first asked for (not when highdicom is imported). If its top-level
    keys cannot be found as expected (two-space indentation, at least ``min_modules`` of them), the whole file is
    parsed once instead, as highdicom itself does: slower and larger, never wrong."""

    def __init__(self, path: Path, min_modules: int = 100) -> None:
        self.path, self.min_modules = path, min_modules
        self._spans: dict[str, tuple[int, int]] | None = None
        self._parsed: dict[str, list[dict[str, Any]]] = {}
        self.whole = False  # True once the file had to be parsed whole

    def _index(self) -> dict[str, tuple[int, int]]:
        if self._spans is None:
            data = self.path.read_bytes()
            keys = list(_KEY.finditer(data))
            spans: dict[str, tuple[int, int]] = {}
            for index, match in enumerate(keys):
                # From the list's "[" to just before the next key (or the closing brace): one value and a comma.
                end = keys[index + 1].start() if index + 1 < len(keys) else data.rstrip().rfind(b"}")
                spans[match.group(1).decode()] = (match.end() - 1, end)
            if len(spans) < self.min_modules:
                log.warning("%s is not laid out as expected (%d modules found): parsing it whole", self.path,
                            len(spans))
                self._parsed = json.loads(data)
                self.whole = True
                spans = {module: (0, 0) for module in self._parsed}
            self._spans = spans
        return self._spans

    def __getitem__(self, module: str) -> list[dict[str, Any]]:
        if module not in self._parsed:
            start, end = self._index()[module]  # KeyError for an unknown module, as with a dict
            with self.path.open("rb") as table:
                table.seek(start)
                text = table.read(end - start).rstrip().rstrip(b",")
            self._parsed[module] = json.loads(text)
        return self._parsed[module]

    def __contains__(self, module: object) -> bool:
        return module in self._index()

    def __iter__(self) -> Iterator[str]:
        return iter(self._index())

    def __len__(self) -> int:
        return len(self._index())


_installed: ModuleAttributeMap | None = None


def installed() -> ModuleAttributeMap | None:
    return _installed


def install() -> bool:
    """Make highdicom use :class:`ModuleAttributeMap`; True if it does (idempotent)."""
    global _installed
    if _installed is not None:
        return True
    import importlib

    try:
        users = [importlib.import_module(name) for name in USERS]
        path = Path(str(resources.files("highdicom") / TABLE))
        if not path.is_file():
            raise LookupError(f"highdicom has no {TABLE}")
        if not all(callable(getattr(module, "get_module_attribute_map", None)) for module in users):
            raise LookupError("highdicom has no get_module_attribute_map where expected")
    except (ImportError, LookupError) as exc:
        log.warning("highdicom's module table stays whole in memory: %s", exc)
        return False
    table = ModuleAttributeMap(path)

    def get_module_attribute_map() -> ModuleAttributeMap:
        return table

    for module in users:
        module.get_module_attribute_map = get_module_attribute_map  # type: ignore[attr-defined]
    _installed = table
    return True
