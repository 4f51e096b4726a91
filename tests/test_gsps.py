"""The Grayscale Softcopy Presentation State outlining the peak region on the source image."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom.gsps import build_presentation_state


def _build(source, findings, device):  # type: ignore[no-untyped-def]
    return build_presentation_state(source, findings, device, series_instance_uid=generate_uid(), series_number=9903,
                                    sop_instance_uid=generate_uid(), instance_number=1)


def test_gsps_outlines_the_region_on_the_source(tmp_path: Path, dx_source, fracture_findings, device,  # type: ignore[no-untyped-def]
                                                dciodvfy) -> None:
    path = tmp_path / "gsps.dcm"
    _build(dx_source, fracture_findings, device).save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == []
    ds = dcmread(io.BytesIO(path.read_bytes()))
    assert ds.StudyInstanceUID == dx_source.StudyInstanceUID and "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription
    image = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert image.ReferencedSOPInstanceUID == dx_source.SOPInstanceUID
    annotation = ds.GraphicAnnotationSequence[0]
    assert list(annotation.GraphicObjectSequence[0].GraphicData) == [41, 61, 120, 61, 120, 150, 41, 150, 41, 61]
    assert "NOT FOR DIAGNOSTIC USE" in annotation.TextObjectSequence[0].UnformattedTextValue


def test_gsps_needs_a_region(dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="peak region"):
        _build(dx_source, replace(fracture_findings, peak_box=None), device)
