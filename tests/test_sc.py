"""The Secondary Capture: same study and patient, new series, source referenced, legend burned in."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom import sc as sc_module
from dicom.sc import build_secondary_capture


def _overlay(source) -> np.ndarray:  # type: ignore[no-untyped-def]
    rgb = np.zeros((source.Rows, source.Columns, 3), np.uint8)
    rgb[..., 0] = 200  # a red heatmap everywhere
    return rgb


def _build(source, findings, device, overlay=None):  # type: ignore[no-untyped-def]
    return build_secondary_capture(source, _overlay(source) if overlay is None else overlay, findings, device,
                                   series_instance_uid=generate_uid(), series_number=9901,
                                   sop_instance_uid=generate_uid(), instance_number=1)


def test_sc_is_in_the_source_study_and_references_it(dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    _build(dx_source, fracture_findings, device).save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    sc = dcmread(buffer)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate"):
        assert sc[keyword].value == dx_source[keyword].value, keyword
    assert sc.SeriesInstanceUID != dx_source.SeriesInstanceUID
    assert sc.SeriesDescription == "FractureNode AI heatmap (NOT FOR DIAGNOSTIC USE)"
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation) == (256, 256, 3, "RGB")
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == dx_source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == dx_source.SOPClassUID
    (equipment,) = [e for e in sc.ContributingEquipmentSequence if e.Manufacturer == device.manufacturer]
    assert "fn-detector 1.2.0" in equipment.SoftwareVersions and equipment.DeviceSerialNumber == device.uid
    assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments.upper()
    assert sc.DerivationDescription == ("Grad-CAM heatmap of the fracture call and edge overlay by fn-detector 1.2.0, "
                                        "fn-classifier 1.1.0")
    pixels = sc.pixel_array
    assert pixels.shape == (256, 256, 3)
    # the legend band is at the bottom, dark, with red and white text; the top keeps the overlay
    assert pixels[5, 200].tolist() == [200, 0, 0]
    band = pixels[-40:, :]
    assert band.mean() < 80 and (band.min(axis=2) > 200).any()


def test_legend_names_probability_type_and_model(fracture_findings) -> None:  # type: ignore[no-untyped-def]
    text = "\n".join(sc_module.legend_lines(fracture_findings))
    assert "NOT FOR DIAGNOSTIC USE" in text and "0.91" in text and "greenstick" in text
    assert "fn-detector 1.2.0" in text


def test_sc_passes_dciodvfy(tmp_path: Path, dx_source, fracture_findings, device, dciodvfy) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "sc.dcm"
    _build(dx_source, fracture_findings, device).save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == []


def test_overlay_must_have_the_source_geometry(dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="geometry"):
        _build(dx_source, fracture_findings, device, overlay=np.zeros((128, 256, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        _build(dx_source, fracture_findings, device, overlay=np.zeros((256, 256), np.uint8))


def test_huge_sources_are_downscaled(monkeypatch, dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(sc_module, "MAX_SIDE", 128)
    sc = _build(dx_source, fracture_findings, device)
    assert (sc.Rows, sc.Columns) == (128, 128)


def test_source_without_patient_orientation(tmp_path: Path, dx_source, fracture_findings, device, dciodvfy) -> None:  # type: ignore[no-untyped-def]
    del dx_source.PatientOrientation
    sc = _build(dx_source, fracture_findings, device)
    assert sc.PatientOrientation is None or sc.PatientOrientation == ""
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == []
    dx_source.PatientOrientation = ["AF", "H"]
    assert list(_build(dx_source, fracture_findings, device).PatientOrientation) == ["AF", "H"]
