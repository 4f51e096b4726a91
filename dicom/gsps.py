"""Grayscale Softcopy Presentation State: the heatmap's peak region outlined on the original image.

A viewer that applies the presentation state shows the source radiograph with a rectangle around the peak
region and a one-line label (probability, most likely type, "NOT FOR DIAGNOSTIC USE"), without a burned-in
copy of the image (PS3.3 A.33.1; graphic annotations C.10.5). Built with highdicom's
``GrayscaleSoftcopyPresentationState``; one per source image that has a peak region.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom.sr import DISCLAIMER, DeviceIdentity, ImageFindings, contributing_equipment

GSPS_SERIES_DESCRIPTION = "FractureNode AI region (NOT FOR DIAGNOSTIC USE)"
LAYER = "FRACTURENODE"


def label(findings: ImageFindings) -> str:
    kind = f", most likely {findings.top_type}" if findings.top_type else ""
    return f"AI fracture p={findings.fracture_probability:.2f}{kind} - NOT FOR DIAGNOSTIC USE"


def build_presentation_state(source: Dataset, findings: ImageFindings, device: DeviceIdentity, *,
                             series_instance_uid: str, series_number: int, sop_instance_uid: str,
                             instance_number: int) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS outlining ``findings.peak_box`` on ``source``; ``ValueError`` when there is no peak region."""
    if findings.peak_box is None:
        raise ValueError("the findings have no peak region to outline")
    if int(source.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("a grayscale presentation state needs a grayscale source image")
    x0, y0, x1, y1 = findings.peak_box
    cols, rows = int(source.Columns), int(source.Rows)
    x0, x1 = max(1, min(x0 + 1, cols)), max(1, min(x1, cols))  # PIXEL units are 1-based (C.10.5.1.2)
    y0, y1 = max(1, min(y0 + 1, rows)), max(1, min(y1, rows))
    outline = hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.POLYLINE, units=hd.pr.AnnotationUnitsValues.PIXEL,
        graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float))
    text = hd.pr.TextObject(text_value=label(findings)[:1024], units=hd.pr.AnnotationUnitsValues.PIXEL,
                            bounding_box=(1.0, 1.0, float(cols), float(max(2, min(rows, rows // 12 + 2)))),
                            text_justification=hd.pr.TextJustificationValues.LEFT)
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description=f"FractureNode AI region. {DISCLAIMER}"[:64])
    annotation = hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                         graphic_objects=[outline], text_objects=[text])
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=instance_number, manufacturer=device.manufacturer,
        manufacturer_model_name=device.name, software_versions=device.software_version,
        device_serial_number=device.uid[:64], content_label="FRACTURENODE_AI",
        content_description=f"AI fracture region. {DISCLAIMER}"[:64], graphic_annotations=[annotation],
        graphic_layers=[layer], contributing_equipment=[contributing_equipment(device)],
    )
    gsps.SeriesDescription = GSPS_SERIES_DESCRIPTION
    if "Laterality" not in gsps:  # General Series, Type 2C: the source's, else empty (unknown)
        gsps.Laterality = source.get("Laterality") or None
    return gsps
