"""Secondary Capture: the heatmap/edges overlay burned into an RGB image at the source's geometry.

Built with highdicom's ``SCImage.from_ref_dataset``, so the SC is in the source's study with the source's
patient and study modules; it is a new series (one per study and FractureNode run) whose description says
it is not for diagnostic use. A dark legend band at the bottom carries the fracture probability, the most
likely type, the model name and version and "NOT FOR DIAGNOSTIC USE" (Burned In Annotation YES). The source
image is referenced in the Source Image Sequence (PS3.3 C.7.6.1.1.4) and the models in the Contributing
Equipment Sequence. Sources larger than :data:`MAX_SIDE` pixels on a side are downscaled to fit.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom.sr import DISCLAIMER, DeviceIdentity, ImageFindings, contributing_equipment

#: Largest side of an SC; a bigger source is downscaled (aspect kept) so PACS and viewers cope.
MAX_SIDE = 4096
SC_SERIES_DESCRIPTION = "FractureNode AI heatmap (NOT FOR DIAGNOSTIC USE)"


def legend_lines(findings: ImageFindings) -> list[str]:
    """The text burned into the legend band, most important first."""
    lines = ["NOT FOR DIAGNOSTIC USE - research AI output"]
    lines.append(f"Fracture probability {findings.fracture_probability:.2f} ({findings.detection_call.value})")
    if findings.top_type is not None:
        p = "" if findings.top_type_probability is None else f" p={findings.top_type_probability:.2f}"
        lines.append(f"Most likely type: {findings.top_type}{p}")
    lines.append(f"Model: {findings.algorithm.name} {findings.algorithm.version}")
    return lines


def derivation_description(findings: ImageFindings) -> str:
    """What the SC shows and which models made it (the heatmap is the call's: the detector's Grad-CAM, averaged
    with the type reader's where the reader's evidence is fused into the call; pipeline.run.call_heatmap)."""
    models = [m for m in findings.models if m.task in ("detect", "classify")] or [findings.algorithm]
    labels = ", ".join(dict.fromkeys(m.label for m in models))
    return f"Grad-CAM heatmap of the fracture call and edge overlay by {labels}"[:1024]


def render_overlay(hybrid: np.ndarray, findings: ImageFindings) -> np.ndarray:
    """Draw the peak box and the legend band onto a copy of ``hybrid`` (uint8 RGB, H x W x 3)."""
    if hybrid.ndim != 3 or hybrid.shape[2] != 3 or hybrid.dtype != np.uint8:
        raise ValueError(f"hybrid must be uint8 RGB (H, W, 3), got {hybrid.dtype} {hybrid.shape}")
    image = np.ascontiguousarray(hybrid.copy())
    rows, cols = image.shape[:2]
    if findings.peak_box is not None:
        x0, y0, x1, y1 = findings.peak_box
        cv2.rectangle(image, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 255, 0), max(1, cols // 256))
    lines = legend_lines(findings)
    scale = max(0.3, min(cols, rows) / 700.0)
    thickness = max(1, round(scale * 1.5))
    (_, text_h), baseline = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    line_h = text_h + baseline + max(2, text_h // 3)
    band_h = min(rows, line_h * len(lines) + line_h // 2)
    band = image[rows - band_h:, :].astype(np.float32)
    image[rows - band_h:, :] = (band * 0.2).astype(np.uint8)  # dark band, the image stays faintly visible
    for i, text in enumerate(lines):
        y = rows - band_h + line_h * (i + 1) - baseline
        colour = (255, 64, 64) if i == 0 else (255, 255, 255)
        # Shrink a line that would not fit the width.
        line_scale = scale
        width = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, line_scale, thickness)[0][0]
        if width > cols - 8:
            line_scale = scale * (cols - 8) / width
        cv2.putText(image, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, line_scale, colour, thickness, cv2.LINE_AA)
    return image


def _fit(image: np.ndarray) -> np.ndarray:
    rows, cols = image.shape[:2]
    if max(rows, cols) <= MAX_SIDE:
        return image
    factor = MAX_SIDE / max(rows, cols)
    return cv2.resize(image, (max(1, round(cols * factor)), max(1, round(rows * factor))),
                      interpolation=cv2.INTER_AREA)


def build_secondary_capture(source: Dataset, hybrid: np.ndarray, findings: ImageFindings, device: DeviceIdentity, *,
                            series_instance_uid: str, series_number: int, sop_instance_uid: str,
                            instance_number: int) -> hd.sc.SCImage:
    """An RGB Secondary Capture of the overlay for ``source``, in its study, with the legend burned in."""
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns"):
        if keyword not in source:
            raise ValueError(f"the source dataset has no {keyword}")
    if hybrid.shape[:2] != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"the overlay is {hybrid.shape[1]}x{hybrid.shape[0]} but the source is "
                         f"{source.Columns}x{source.Rows}; it must have the source's geometry")
    pixels = _fit(render_overlay(hybrid, findings))
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid, series_number=series_number, sop_instance_uid=sop_instance_uid,
        instance_number=instance_number, manufacturer=device.manufacturer,
        patient_orientation=("L", "F"),  # placeholder: highdicom only takes single-letter values; set below
        transfer_syntax_uid=ExplicitVRLittleEndian, contributing_equipment=[contributing_equipment(device)],
    )
    # The source's orientation as is (it may be compound, e.g. "AF"), or empty (Type 2) when it has none.
    sc.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else None  # type: ignore[assignment]
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = f"{DISCLAIMER} Heatmap of {device.model_label}"[:10240]
    sc.DerivationDescription = derivation_description(findings)
    sc.ManufacturerModelName = device.name
    sc.SoftwareVersions = [device.software_version, *(m.label[:64] for m in device.models)]  # type: ignore[assignment]
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    item.PurposeOfReferenceCodeSequence = [purpose]
    sc.SourceImageSequence = [item]
    for keyword in ("ImageLaterality", "BodyPartExamined"):
        if keyword in source and keyword not in sc:
            setattr(sc, keyword, source.get(keyword))
    if "Laterality" not in sc:  # General Series, Type 2C: copy the source's, else empty (unknown)
        sc.Laterality = source.get("Laterality") or None  # type: ignore[assignment]
    return sc
