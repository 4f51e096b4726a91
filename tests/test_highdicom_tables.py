"""highdicom's module table, read a module at a time: the same values as highdicom's own loader."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import highdicom._standard_utils as hd_standard
import pytest

import dicom.sr  # noqa: F401 - installs the table
from dicom import highdicom_tables
from dicom.highdicom_tables import TABLE, ModuleAttributeMap


def test_every_module_reads_as_highdicom_reads_the_whole_file() -> None:
    path = Path(str(resources.files("highdicom") / TABLE))
    whole = json.loads(path.read_bytes())
    table = ModuleAttributeMap(path)
    assert len(table) == len(whole) > 400 and not table.whole
    assert list(table) == list(whole)
    for module, attributes in whole.items():
        assert module in table and table[module] == attributes
    assert "no-such-module" not in table
    with pytest.raises(KeyError):
        table["no-such-module"]


def test_installed_where_highdicom_looks_it_up() -> None:
    import highdicom.base
    import highdicom.image

    table = highdicom_tables.installed()
    assert isinstance(table, ModuleAttributeMap)
    for module in (hd_standard, highdicom.base, highdicom.image):
        assert module.get_module_attribute_map() is table
    assert highdicom_tables.install() is True  # idempotent
    tree = hd_standard.construct_module_tree("general-study")  # a highdicom function through the table
    assert "StudyInstanceUID" in tree["attributes"]


def test_a_file_not_laid_out_as_expected_is_parsed_whole(tmp_path: Path) -> None:
    compact = tmp_path / "table.json"  # no two-space indented keys: the index finds nothing
    entries = {"patient": [{"keyword": "PatientName", "type": "2", "path": []}], "general-study": []}
    compact.write_text(json.dumps(entries))
    table = ModuleAttributeMap(compact)
    assert dict(table) == entries and table.whole
    indented = tmp_path / "indented.json"
    indented.write_text(json.dumps(entries, indent=2))
    small = ModuleAttributeMap(indented, min_modules=2)
    assert small["patient"] == entries["patient"] and list(small) == list(entries) and not small.whole


def test_the_table_is_read_on_first_use_not_at_import() -> None:
    table = ModuleAttributeMap(Path("/nonexistent/module_attribute_map.json"))  # no error until used
    with pytest.raises(FileNotFoundError):
        len(table)
