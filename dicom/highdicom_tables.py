"""highdicom's table of every DICOM module's attributes, read one module at a time.

highdicom 0.28 reads ``_standard/module_attribute_map.json`` (22 MB, 436 modules) whole into Python lists and
dicts the first time it copies a source's Patient and Study modules (every SC and SR we build) and keeps it
for the life of the process: about 75 MB more resident memory in a worker from its first report on
(measured for issue #9), to look up the handful of modules of one or two IODs.

:func:`install` swaps highdicom's cached loader for one that indexes where each module's list starts in that
file and parses a module when it is first asked for (then keeps it). The values are those of highdicom's own
loader (a test compares every module). If highdicom's file or loader is not where this expects, nothing is
changed and highdicom keeps its own.
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
    """Module key (``"general-series"``) -> attribute list, parsed from ``path`` on first access."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = path.read_bytes()
        keys = list(_KEY.finditer(data))
        self._spans: dict[str, tuple[int, int]] = {}
        for index, match in enumerate(keys):
            # From the list's "[" to just before the next key (or the closing brace): one JSON value and a comma.
            end = keys[index + 1].start() if index + 1 < len(keys) else data.rstrip().rfind(b"}")
            self._spans[match.group(1).decode()] = (match.end() - 1, end)
        self._parsed: dict[str, list[dict[str, Any]]] = {}

    def __getitem__(self, module: str) -> list[dict[str, Any]]:
        if module not in self._parsed:
            start, end = self._spans[module]  # KeyError for an unknown module, as with a dict
            with self.path.open("rb") as table:
                table.seek(start)
                text = table.read(end - start).rstrip().rstrip(b",")
            self._parsed[module] = json.loads(text)
        return self._parsed[module]

    def __contains__(self, module: object) -> bool:
        return module in self._spans

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


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
        if not all(callable(getattr(module, "get_module_attribute_map", None)) for module in users):
            raise LookupError("highdicom has no get_module_attribute_map where expected")
        table = ModuleAttributeMap(path)
        if len(table) < 100 or "patient" not in table or "general-study" not in table:
            raise LookupError(f"{TABLE} is not laid out as expected ({len(table)} modules found)")
    except (ImportError, OSError, LookupError) as exc:
        log.warning("highdicom's module table stays whole in memory: %s", exc)
        return False

    def get_module_attribute_map() -> ModuleAttributeMap:
        return table

    for module in users:
        module.get_module_attribute_map = get_module_attribute_map  # type: ignore[attr-defined]
    _installed = table
    return True
