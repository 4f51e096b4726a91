"""Structured Report: one TID 1500 Measurement Report per study, built with highdicom.

Each analysed image gets one measurement group (TID 1410 "Planar ROI Measurements and Qualitative
Evaluations" when the heatmap has a peak region, referencing it as an SCOORD on the source image; otherwise
TID 1501 "Measurement and Qualitative Evaluation Group" with the image as its source). A group carries

- the fracture presence as a qualitative evaluation (SCT 125605004 "Fracture of bone" = Present / Absent /
  Indeterminate),
- the fracture probability (DCM 122157 "Probability") and the operating point, and the probability of each
  of the eleven types, as numeric measurements (UCUM "1"),
- the most likely type as the group's coded finding (DCM 121071 "Finding" = the type's code, see
  :mod:`dicom.codes`; SCT 125605004 "Fracture of bone" when no type was asked),
- the algorithm identification (TID 4019: name, version, and each model bundle's SHA-256 as parameters).

The observer is the device (TID 1004), identified by a Device Observer UID derived from FractureNode's
version and the model bundles' hashes, so it changes whenever a model does (IHE AI Results). The document
is COMPLETE and UNVERIFIED.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom import codes as fn_codes
from dicom import highdicom_tables
from pipeline.taxonomy import FRACTURE_TYPES
from pipeline.types import ModelIdentity

highdicom_tables.install()  # highdicom's 22 MB table of module attributes, read a module at a time (see there)

DISCLAIMER = "Research use only. NOT FOR DIAGNOSTIC USE."
MANUFACTURER = "FractureNode project"
DEVICE_NAME = "FractureNode"
SR_SERIES_DESCRIPTION = "FractureNode AI findings (NOT FOR DIAGNOSTIC USE)"


def fracturenode_version() -> str:
    try:
        return metadata.version("fracture-node")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


class DetectionCallValues(enum.Enum):
    """What the detector concluded about one image."""

    FRACTURE = "fracture"
    NO_FRACTURE = "no_fracture"
    INDETERMINATE = "indeterminate"


@dataclass(frozen=True)
class DeviceIdentity:
    """The observing device: FractureNode at a version, running a set of model bundles (IHE AIR)."""

    models: tuple[ModelIdentity, ...]
    software_version: str = field(default_factory=fracturenode_version)
    name: str = DEVICE_NAME
    manufacturer: str = MANUFACTURER

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a device identity needs at least one model")

    @property
    def uid(self) -> str:
        """Device Observer UID: the same for the same FractureNode version and model bundles, else new."""
        sources = [self.name, self.software_version, *sorted(f"{m.name}:{m.version}:{m.sha256}" for m in self.models)]
        return str(generate_uid(entropy_srcs=sources))

    @property
    def model_label(self) -> str:
        """Name and version of the models, e.g. ``fracture-detector 1.0; fracture-classifier 1.0``."""
        return "; ".join(m.label for m in self.models)


@dataclass(frozen=True)
class ImageFindings:
    """What FractureNode concluded about one image (plain data; validated on construction).

    ``peak_box`` is ``(x0, y0, x1, y1)`` in source pixel coordinates (x right, y down, x1/y1 exclusive).
    ``referenced_sop_instance_uid`` names the image the findings are about (filled by the SR parser; the
    builder takes it from the source dataset).
    """

    fracture_probability: float
    detection_call: DetectionCallValues
    algorithm: ModelIdentity
    models: tuple[ModelIdentity, ...] = ()
    operating_point: float | None = None
    top_type: str | None = None
    top_type_probability: float | None = None
    type_distribution: dict[str, float] = field(default_factory=dict)
    peak_box: tuple[int, int, int, int] | None = None
    referenced_sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.detection_call, DetectionCallValues):
            raise ValueError(f"detection_call must be a DetectionCallValues, not {self.detection_call!r}")
        for name in ("fracture_probability", "operating_point", "top_type_probability"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, float | int) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if self.top_type is not None and self.top_type not in FRACTURE_TYPES:
            raise ValueError(f"top_type {self.top_type!r} is not a taxonomy label")
        for label, p in self.type_distribution.items():
            if label not in FRACTURE_TYPES:
                raise ValueError(f"type_distribution has unknown label {label!r}")
            if not 0.0 <= p <= 1.0 or math.isnan(p):
                raise ValueError(f"type_distribution[{label!r}]={p!r} is not a probability")
        if self.peak_box is not None:
            if len(self.peak_box) != 4:
                raise ValueError(f"peak_box must be (x0, y0, x1, y1), got {self.peak_box!r}")
            x0, y0, x1, y1 = self.peak_box
            if not (0 <= x0 < x1 and 0 <= y0 < y1):
                raise ValueError(f"peak_box {self.peak_box!r} is empty or negative")

    @classmethod
    def from_values(cls, *, fracture_probability: float, detection_call: str, model_name: str, model_version: str,
                    models: Sequence[dict[str, str]] = (), **kwargs: object) -> ImageFindings:
        """Build from the plain values the database stores (``models`` as ``[{name, version, sha256, task}]``)."""
        identities = tuple(ModelIdentity(name=str(m["name"]), version=str(m["version"]),
                                         sha256=str(m.get("sha256", "")), task=str(m.get("task", "")))
                           for m in models)
        algorithm_sha = next((m.sha256 for m in identities if m.name == model_name), "")
        box: Sequence[int] | None = kwargs.pop("peak_box", None)  # type: ignore[assignment]
        peak = (int(box[0]), int(box[1]), int(box[2]), int(box[3])) if box else None
        return cls(fracture_probability=float(fracture_probability),
                   detection_call=DetectionCallValues(detection_call),
                   algorithm=ModelIdentity(model_name, model_version, algorithm_sha),
                   models=identities, peak_box=peak, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- build


def model_parameter(model: ModelIdentity) -> str:
    """One Algorithm Parameters (DCM 111002) value describing a model bundle; parsed by :mod:`dicom.sr_parse`."""
    return f"task={model.task}; name={model.name}; version={model.version}; sha256={model.sha256}"


def algorithm_identification(model: ModelIdentity,
                             models: Sequence[ModelIdentity] = ()) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification: name, version, and each model bundle (with its SHA-256) as a parameter."""
    return hd.sr.AlgorithmIdentification(
        name=model.name, family=fn_codes.ARTIFICIAL_INTELLIGENCE, version=model.version,
        parameters=[model_parameter(m) for m in (models or [model])],
    )


def _model_for(findings: ImageFindings, task: str) -> ModelIdentity:
    """The model of ``task`` (a bundle card's task: ``detect``, ``classify``) among the findings' models, or the
    findings' algorithm (the detector) where none is listed."""
    return next((m for m in findings.models if m.task == task), findings.algorithm)


def _measurements(findings: ImageFindings) -> list[hd.sr.Measurement]:
    detector = algorithm_identification(_model_for(findings, "detect"))
    classifier = algorithm_identification(_model_for(findings, "classify"))
    items = [hd.sr.Measurement(name=fn_codes.PROBABILITY, value=float(findings.fracture_probability),
                               unit=fn_codes.NO_UNITS, algorithm_id=detector)]
    if findings.operating_point is not None:
        items.append(hd.sr.Measurement(name=fn_codes.OPERATING_POINT, value=float(findings.operating_point),
                                       unit=fn_codes.NO_UNITS, algorithm_id=detector))
    for label in FRACTURE_TYPES:
        if label in findings.type_distribution:
            items.append(hd.sr.Measurement(name=fn_codes.TYPE_PROBABILITY_CODES[label],
                                           value=float(findings.type_distribution[label]),
                                           unit=fn_codes.NO_UNITS, algorithm_id=classifier))
    return items


def _evaluations(findings: ImageFindings) -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(name=fn_codes.FRACTURE_OF_BONE,
                                        value=fn_codes.DETECTION_CALL_CODES[findings.detection_call.value])]


def peak_region(source: Dataset, box: tuple[int, int, int, int]) -> hd.sr.ImageRegion:
    """The peak box as a closed POLYLINE SCOORD on ``source`` (column, row image coordinates)."""
    x0, y0, x1, y1 = box
    cols, rows = int(source.Columns), int(source.Rows)
    x0, x1 = min(x0, cols - 1), min(x1, cols)
    y0, y1 = min(y0, rows - 1), min(y1, rows)
    data = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=data,
                             source_image=hd.sr.SourceImageForRegion.from_source_image(source))


class ImageFractureFindingGroup:
    """Builds the TID 1410 (with a peak region) or TID 1501 (without) group for one image's findings."""

    def __init__(self, source: Dataset, findings: ImageFindings, index: int) -> None:
        if "SOPInstanceUID" not in source or "SOPClassUID" not in source:
            raise ValueError("the source image needs SOPInstanceUID and SOPClassUID")
        if index < 1:
            raise ValueError(f"index must be >= 1, got {index}")
        self.source = source
        self.findings = findings
        self.index = index

    def build(self) -> (hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                        | hd.sr.MeasurementsAndQualitativeEvaluations):
        algorithm = algorithm_identification(self.findings.algorithm, self.findings.models)
        tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"Fracture finding, image {self.index}")
        finding = (fn_codes.FRACTURE_TYPE_CODES[self.findings.top_type] if self.findings.top_type is not None
                   else fn_codes.FRACTURE_OF_BONE)
        common = dict(tracking_identifier=tracking, finding_type=finding, algorithm_id=algorithm,
                      measurements=_measurements(self.findings),
                      qualitative_evaluations=_evaluations(self.findings))
        if self.findings.peak_box is not None:
            return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=peak_region(self.source, self.findings.peak_box), **common)  # type: ignore[arg-type]
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(self.source)],
            **common)  # type: ignore[arg-type]


class FractureMeasurementReport:
    """TID 1500 Measurement Report for one study: one group per analysed image, observed by the device."""

    def __init__(self, images: Sequence[tuple[Dataset, ImageFindings]], device: DeviceIdentity) -> None:
        if not images:
            raise ValueError("a report needs at least one analysed image")
        studies = {str(src.StudyInstanceUID) for src, _ in images}
        if len(studies) != 1:
            raise ValueError(f"all images of a report must be in one study, got {sorted(studies)}")
        self.images = list(images)
        self.device = device

    def observation_context(self) -> hd.sr.ObservationContext:
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=self.device.uid, name=self.device.name, manufacturer_name=self.device.manufacturer,
            model_name=self.device.model_label[:64], serial_number=self.device.software_version,
        )
        return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))

    def build(self) -> hd.sr.MeasurementReport:
        groups = [ImageFractureFindingGroup(src, findings, i).build()
                  for i, (src, findings) in enumerate(self.images, start=1)]
        return hd.sr.MeasurementReport(
            observation_context=self.observation_context(), procedure_reported=fn_codes.PLAIN_RADIOGRAPHY,
            imaging_measurements=groups, title=fn_codes.IMAGING_MEASUREMENT_REPORT,
        )


def contributing_equipment(device: DeviceIdentity) -> hd.ContributingEquipment:
    """Contributing Equipment Sequence item naming FractureNode and its models (IHE AI Results)."""
    return hd.ContributingEquipment(
        manufacturer=device.manufacturer, purpose_of_reference=fn_codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=device.name,
        software_versions=[f"{device.name} {device.software_version}", *(m.label[:64] for m in device.models)],
        device_serial_number=device.uid, contribution_description=f"AI fracture analysis. {DISCLAIMER}"[:64],
    )


def build_structured_report(images: Sequence[tuple[Dataset, ImageFindings]], device: DeviceIdentity, *,
                            series_instance_uid: str, series_number: int, sop_instance_uid: str,
                            instance_number: int = 1) -> hd.sr.Comprehensive3DSR:
    """The study's Comprehensive 3D SR document (COMPLETE, UNVERIFIED), with ``99FRACNODE`` described."""
    content = FractureMeasurementReport(images, device).build()
    sr = hd.sr.Comprehensive3DSR(
        evidence=[src for src, _ in images], content=content, series_instance_uid=series_instance_uid,
        series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=instance_number,
        manufacturer=device.manufacturer, is_complete=True, is_final=False, is_verified=False,
        contributing_equipment=[contributing_equipment(device)],
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.ManufacturerModelName = device.name
    sr.SoftwareVersions = [device.software_version, *(m.label[:64] for m in device.models)]  # type: ignore[assignment]
    sr.CodingSchemeIdentificationSequence = [fn_codes.coding_scheme_identification()]
    if sr.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return sr
