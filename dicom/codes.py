"""Coded concepts used in FractureNode's DICOM outputs (PS3.16), including our private coding scheme.

Standard concepts come from DCM (PS3.16 Annex D), SNOMED CT (``SCT``) and UCUM. Where no standard concept
was found for a fracture morphology or for one of our measurements, a concept of the private coding scheme
``99FRACNODE`` is used; every code is listed in ``docs/DICOM.md`` (PS3.3 C.7.6.16.2.6 / 8.1: coding scheme
designators beginning with "99" are private). :func:`coding_scheme_identification` describes the private
scheme for the Coding Scheme Identification Sequence (0008,0110).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipeline.taxonomy import FRACTURE_TYPES

#: Private coding scheme designator (PS3.3 8.2: "99" prefix marks a private scheme).
PRIVATE_SCHEME = "99FRACNODE"
PRIVATE_SCHEME_NAME = "FractureNode private codes"
PRIVATE_SCHEME_VERSION = "1"
PRIVATE_SCHEME_RESPONSIBLE = "FractureNode project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# ------------------------------------------------------------------------------------------- standard
#: SCT 125605004 "Fracture of bone" (disorder): the finding type of every measurement group.
FRACTURE_OF_BONE = Code("125605004", "SCT", "Fracture of bone")
#: DCM 121071 "Finding": concept name of the qualitative evaluation carrying the most likely type.
FINDING: Code = codes.DCM.Finding
#: DCM 121053/121054 and SCT 82334004: values of the fracture presence evaluation.
PRESENT: Code = codes.DCM.Present
ABSENT: Code = codes.DCM.Absent
INDETERMINATE: Code = codes.SCT.Indeterminate
#: DCM 122157 "Probability": concept name of the fracture (detection) probability.
PROBABILITY: Code = codes.DCM.Probability
#: UCUM "1" (no units): unit of every probability (a number in [0, 1]).
NO_UNITS: Code = codes.UCUM.NoUnits
#: DCM 123110 "Artificial Intelligence": algorithm family (TID 4019).
ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence
#: DCM 126000 "Imaging Measurement Report": document title (TID 1500).
IMAGING_MEASUREMENT_REPORT: Code = codes.DCM.ImagingMeasurementReport
#: SCT 168537006 "Plain radiography": procedure reported.
PLAIN_RADIOGRAPHY: Code = codes.SCT.PlainRadiography
#: DCM 109102 "Processing Equipment": purpose of reference of the Contributing Equipment Sequence.
PROCESSING_EQUIPMENT: Code = codes.DCM.ProcessingEquipment

# ------------------------------------------------------------------------------------ fracture types
#: SNOMED CT morphologic abnormality concepts we could verify (see docs/DICOM.md for the sources).
_STANDARD_TYPE_CODES: dict[str, Code] = {
    "greenstick": Code("30543000", "SCT", "Greenstick fracture"),
}

#: Our private concepts, one per taxonomy label; used where no verified standard concept exists.
PRIVATE_TYPE_CODES: dict[str, Code] = {
    label: _private(f"FN-T{index:02d}", f"{label.replace('_', ' ').capitalize()} fracture")
    for index, label in enumerate(FRACTURE_TYPES)
}
PRIVATE_TYPE_CODES["fracture_dislocation"] = _private("FN-T10", "Fracture dislocation")

#: taxonomy label -> the code that stands for the fracture type (standard where verified, else private).
FRACTURE_TYPE_CODES: dict[str, Code] = {label: _STANDARD_TYPE_CODES.get(label, PRIVATE_TYPE_CODES[label])
                                        for label in FRACTURE_TYPES}

#: taxonomy label -> concept name of the numeric measurement "probability of this type" (private).
TYPE_PROBABILITY_CODES: dict[str, Code] = {
    label: _private(f"FN-P{index:02d}", f"Probability of {PRIVATE_TYPE_CODES[label].meaning.lower()}")
    for index, label in enumerate(FRACTURE_TYPES)
}

#: Concept name of the detection operating point (the threshold the call was made at).
OPERATING_POINT = _private("FN-OP", "Fracture detection operating point")

#: detection call -> value of the presence evaluation
DETECTION_CALL_CODES: dict[str, Code] = {"fracture": PRESENT, "no_fracture": ABSENT, "indeterminate": INDETERMINATE}


def code_key(code: Code | Dataset) -> tuple[str, str]:
    """``(scheme designator, code value)`` of a Code or a code sequence item, for lookups."""
    return (str(code.CodingSchemeDesignator if isinstance(code, Dataset) else code.scheme_designator),
            str(code.CodeValue if isinstance(code, Dataset) else code.value))


TYPE_BY_CODE: dict[tuple[str, str], str] = {
    **{code_key(code): label for label, code in PRIVATE_TYPE_CODES.items()},
    **{code_key(code): label for label, code in FRACTURE_TYPE_CODES.items()},
}
TYPE_BY_PROBABILITY_CODE: dict[tuple[str, str], str] = {
    code_key(code): label for label, code in TYPE_PROBABILITY_CODES.items()
}
CALL_BY_CODE: dict[tuple[str, str], str] = {code_key(code): call for call, code in DETECTION_CALL_CODES.items()}


def coding_scheme_identification() -> Dataset:
    """An item of the Coding Scheme Identification Sequence (0008,0110) describing ``99FRACNODE``."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_RESPONSIBLE
    return item
