"""Our own TID 1500 Structured Report back to :class:`dicom.sr.ImageFindings` (one per measurement group).

This reads what :mod:`dicom.sr` writes, so the round trip can be tested, and lets tools that receive our SR
(or fetch it back from a PACS) recover the findings without the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom import codes as fn_codes
from dicom.sr import DetectionCallValues, ImageFindings
from pipeline.types import ModelIdentity

_MEASUREMENT_GROUP = ("DCM", "125007")
_IMAGING_MEASUREMENTS = ("DCM", "126010")
_FINDING = ("DCM", "121071")
_ALGORITHM_NAME = ("DCM", "111001")
_ALGORITHM_VERSION = ("DCM", "111003")
_ALGORITHM_PARAMETERS = ("DCM", "111002")
_DEVICE_OBSERVER_UID = ("DCM", "121012")
_PROBABILITY = fn_codes.code_key(fn_codes.PROBABILITY)
_OPERATING_POINT = fn_codes.code_key(fn_codes.OPERATING_POINT)
_FRACTURE_OF_BONE = fn_codes.code_key(fn_codes.FRACTURE_OF_BONE)


@dataclass(frozen=True)
class ParsedReport:
    """The findings of one SR document, and who made them."""

    study_instance_uid: str
    sop_instance_uid: str
    device_observer_uid: str | None
    verification_flag: str
    completion_flag: str
    images: list[ImageFindings]


def _concept(item: Dataset) -> tuple[str, str]:
    return fn_codes.code_key(item.ConceptNameCodeSequence[0])


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def parse_model(text: str) -> ModelIdentity:
    """Inverse of :func:`dicom.sr.model_parameter`."""
    fields = dict(part.split("=", 1) for part in text.split("; ") if "=" in part)
    return ModelIdentity(name=fields.get("name", ""), version=fields.get("version", ""),
                         sha256=fields.get("sha256", ""), task=fields.get("task", ""))


def _group_findings(group: Dataset) -> ImageFindings:
    values: dict[str, object] = {"type_distribution": {}}
    call = None
    algorithm_name = algorithm_version = ""
    models: list[ModelIdentity] = []
    top_type = None
    for item in _children(group):
        key = _concept(item)
        if item.ValueType == "CODE" and key == _FINDING:
            top_type = fn_codes.TYPE_BY_CODE.get(fn_codes.code_key(item.ConceptCodeSequence[0]))
        elif item.ValueType == "CODE" and key == _FRACTURE_OF_BONE:
            call = fn_codes.CALL_BY_CODE.get(fn_codes.code_key(item.ConceptCodeSequence[0]))
        elif item.ValueType == "TEXT" and key == _ALGORITHM_NAME:
            algorithm_name = str(item.TextValue)
        elif item.ValueType == "TEXT" and key == _ALGORITHM_VERSION:
            algorithm_version = str(item.TextValue)
        elif item.ValueType == "TEXT" and key == _ALGORITHM_PARAMETERS:
            models.append(parse_model(str(item.TextValue)))
        elif item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
            if key == _PROBABILITY:
                values["fracture_probability"] = value
            elif key == _OPERATING_POINT:
                values["operating_point"] = value
            elif key in fn_codes.TYPE_BY_PROBABILITY_CODE:
                values["type_distribution"][fn_codes.TYPE_BY_PROBABILITY_CODE[key]] = value  # type: ignore[index]
        elif item.ValueType == "SCOORD":
            xs, ys = item.GraphicData[0::2], item.GraphicData[1::2]
            values["peak_box"] = (round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys)))
            values["referenced_sop_instance_uid"] = _referenced_uid(item)
        elif item.ValueType == "IMAGE":
            values["referenced_sop_instance_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    if call is None or "fracture_probability" not in values:
        raise ValueError("measurement group has no fracture presence or probability: not a FractureNode group")
    distribution: dict[str, float] = values["type_distribution"]  # type: ignore[assignment]
    algorithm = next((m for m in models if m.name == algorithm_name and m.version == algorithm_version),
                     ModelIdentity(algorithm_name, algorithm_version, ""))
    return ImageFindings(
        fracture_probability=values["fracture_probability"],  # type: ignore[arg-type]
        detection_call=DetectionCallValues(call), algorithm=algorithm, models=tuple(models),
        operating_point=values.get("operating_point"),  # type: ignore[arg-type]
        top_type=top_type, top_type_probability=distribution.get(top_type) if top_type else None,
        type_distribution=distribution, peak_box=values.get("peak_box"),  # type: ignore[arg-type]
        referenced_sop_instance_uid=values.get("referenced_sop_instance_uid"),  # type: ignore[arg-type]
    )


def _referenced_uid(scoord: Dataset) -> str | None:
    for child in _children(scoord):
        if child.ValueType == "IMAGE":
            return str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


def parse_report(sr: Dataset) -> ParsedReport:
    """Findings of every image in a FractureNode TID 1500 report; ``ValueError`` if it is not one."""
    if "ContentSequence" not in sr or "ConceptNameCodeSequence" not in sr:
        raise ValueError("not an SR document (no content)")
    title = fn_codes.code_key(sr.ConceptNameCodeSequence[0])
    if title != fn_codes.code_key(fn_codes.IMAGING_MEASUREMENT_REPORT):
        raise ValueError(f"not a TID 1500 Imaging Measurement Report (title {title})")
    device_uid = None
    images: list[ImageFindings] = []
    for item in sr.ContentSequence:
        key = _concept(item)
        if key == _DEVICE_OBSERVER_UID:
            device_uid = str(item.UID)
        elif key == _IMAGING_MEASUREMENTS:
            images.extend(_group_findings(group) for group in _children(item)
                          if _concept(group) == _MEASUREMENT_GROUP)
    return ParsedReport(study_instance_uid=str(sr.StudyInstanceUID), sop_instance_uid=str(sr.SOPInstanceUID),
                        device_observer_uid=device_uid, verification_flag=str(sr.get("VerificationFlag", "")),
                        completion_flag=str(sr.get("CompletionFlag", "")), images=images)
