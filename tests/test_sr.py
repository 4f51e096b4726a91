"""The TID 1500 Structured Report: built, written to a buffer, read back, parsed back to the same findings."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom import codes
from dicom.sr import DetectionCallValues, DeviceIdentity, ImageFindings, build_structured_report
from dicom.sr_parse import parse_report
from pipeline.types import ModelIdentity
from tests.conftest import make_dx_dataset


def _build(images, device):  # type: ignore[no-untyped-def]
    return build_structured_report(images, device, series_instance_uid=generate_uid(), series_number=9902,
                                   sop_instance_uid=generate_uid())


def _roundtrip(ds):  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def test_report_reads_back_to_the_same_findings(dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    second = make_dx_dataset(study_uid=dx_source.StudyInstanceUID)
    negative = replace(fracture_findings, fracture_probability=0.08, detection_call=DetectionCallValues.NO_FRACTURE,
                       top_type=None, top_type_probability=None, type_distribution={}, peak_box=None)
    sr = _roundtrip(_build([(dx_source, fracture_findings), (second, negative)], device))

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == dx_source.StudyInstanceUID and sr.PatientID == dx_source.PatientID
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.PRIVATE_SCHEME
    assert "NOT FOR DIAGNOSTIC USE" in sr.ContributingEquipmentSequence[0].ContributionDescription.upper()

    parsed = parse_report(sr)
    assert parsed.device_observer_uid == device.uid
    first, other = parsed.images
    assert first.referenced_sop_instance_uid == dx_source.SOPInstanceUID
    assert first == replace(fracture_findings, referenced_sop_instance_uid=dx_source.SOPInstanceUID)
    assert other == replace(negative, referenced_sop_instance_uid=second.SOPInstanceUID)

    # highdicom reads it as a measurement report with the region on the source image
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    region = groups[0].roi
    assert region is not None and region.GraphicType == "POLYLINE"
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == dx_source.SOPInstanceUID
    assert groups[0].finding_type.value == codes.FRACTURE_TYPE_CODES["greenstick"].value


def test_sr_passes_dciodvfy(tmp_path: Path, dx_source, fracture_findings, device, dciodvfy) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "sr.dcm"
    _build([(dx_source, fracture_findings)], device).save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == []


def test_device_uid_changes_with_the_model_version(fracture_findings) -> None:  # type: ignore[no-untyped-def]
    base = DeviceIdentity(models=fracture_findings.models, software_version="0.1.0")
    same = DeviceIdentity(models=fracture_findings.models, software_version="0.1.0")
    newer = DeviceIdentity(models=(ModelIdentity("fn-detector", "1.3.0", "c" * 64, "detect"),),
                           software_version="0.1.0")
    assert base.uid == same.uid
    assert base.uid != newer.uid
    assert base.uid != DeviceIdentity(models=fracture_findings.models, software_version="0.2.0").uid


@pytest.mark.parametrize("change, message", [
    ({"fracture_probability": 1.5}, "fracture_probability"),
    ({"top_type": "broken"}, "top_type"),
    ({"type_distribution": {"wobbly": 0.1}}, "unknown label"),
    ({"peak_box": (10, 10, 5, 20)}, "peak_box"),
    ({"detection_call": "fracture"}, "DetectionCallValues"),
])
def test_findings_are_validated(fracture_findings, change, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        replace(fracture_findings, **change)


def test_report_refuses_images_of_two_studies(dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="one study"):
        _build([(dx_source, fracture_findings), (make_dx_dataset(), fracture_findings)], device)


def test_every_taxonomy_type_round_trips(dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    from pipeline.taxonomy import FRACTURE_TYPES

    images = []
    for label in FRACTURE_TYPES:
        src = make_dx_dataset(study_uid=dx_source.StudyInstanceUID)
        images.append((src, replace(fracture_findings, top_type=label)))
    parsed = parse_report(_roundtrip(_build(images, device)))
    assert [f.top_type for f in parsed.images] == list(FRACTURE_TYPES)


def test_from_values_maps_database_values(fracture_findings) -> None:  # type: ignore[no-untyped-def]
    findings = ImageFindings.from_values(
        fracture_probability=0.7, detection_call="indeterminate", model_name="fn-detector", model_version="1.2.0",
        models=[{"name": "fn-detector", "version": "1.2.0", "sha256": "a" * 64, "task": "detector"}],
        peak_box=[1, 2, 30, 40], top_type="spiral", type_distribution={"spiral": 0.9})
    assert findings.detection_call is DetectionCallValues.INDETERMINATE
    assert findings.algorithm.sha256 == "a" * 64 and findings.peak_box == (1, 2, 30, 40)


def _algorithm_names(item, found: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Each NUM item's concept code value -> the name of the algorithm (DCM 111001) that measured it."""
    for child in item.get("ContentSequence", []):
        if child.ValueType == "NUM":
            names = [c.TextValue for c in child.get("ContentSequence", [])
                     if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == "111001"]
            found[child.ConceptNameCodeSequence[0].CodeValue] = names[0] if names else ""
        _algorithm_names(child, found)


def test_each_measurement_names_the_model_that_made_it(dx_source, fracture_findings, device) -> None:  # type: ignore[no-untyped-def]
    """With the models as a worker stores them (tasks ``detect`` and ``classify``, as the bundles' cards name
    them), the fracture probability names the detector and every type probability the classifier."""
    assert {m.task for m in fracture_findings.models} == {"detect", "classify"}
    found: dict[str, str] = {}
    _algorithm_names(_roundtrip(_build([(dx_source, fracture_findings)], device)), found)
    assert found[codes.PROBABILITY.value] == "fn-detector"
    type_codes = {codes.TYPE_PROBABILITY_CODES[label].value for label in fracture_findings.type_distribution}
    assert type_codes <= set(found)
    assert {found[c] for c in type_codes} == {"fn-classifier"}
