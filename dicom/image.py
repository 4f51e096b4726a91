"""From a DICOM dataset, PNG or JPEG to the models' input (:class:`pipeline.types.Radiograph`).

Grayscale pipeline, in the order PS3.3 C.11 and PS3.4 N.2 give it:

1. stored values -> Modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence);
2. VOI: the first VOI LUT Sequence item if present, else the first Window Center/Width pair with its
   VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), else a robust 0.5-99.5 percentile window;
3. MONOCHROME1 is inverted so that bone is bright.

Multi-frame objects: the first frame is analysed (documented in the README); the frame count is kept.
Colour images keep their RGB pixels so the validity stage can refuse them with a reason.
Unsupported or corrupt pixel data raises :class:`ImageDecodeError` with a human-readable reason.
"""

from __future__ import annotations

import logging
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut, apply_voi

from dicom.limits import MAX_IMAGE_PIXELS, InputTooLarge, decoded_size_problem, read_part10
from pipeline.types import Radiograph

log = logging.getLogger(__name__)

#: Refuse to decode frames larger than this many pixels (40 MP, shared with uploads: see dicom.limits); the
#: decoded bytes of all frames are capped too (dicom.limits.MAX_DECODED_BYTES).
MAX_PIXELS = MAX_IMAGE_PIXELS
MAX_FRAMES = 1024

#: Storage SOP classes of plain radiographs (PS3.4 B.5).
RADIOGRAPH_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3": "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
SECONDARY_CAPTURE_SOP_CLASSES = {uid for uid, name in RADIOGRAPH_SOP_CLASSES.items() if "Secondary" in name}
#: Modalities of projection radiographs. SC objects often say OT (other) or XC.
RADIOGRAPH_MODALITIES = {"CR", "DX", "IO", "RG", "PX"}
SC_MODALITIES = RADIOGRAPH_MODALITIES | {"OT", "XC", "SC", ""}
MODALITY_NAMES = {
    "CT": "CT", "MR": "MR", "US": "ultrasound", "NM": "nuclear medicine", "PT": "PET", "MG": "mammography",
    "XA": "angiography", "RF": "fluoroscopy", "OP": "ophthalmic photography", "SM": "slide microscopy",
    "ES": "endoscopy", "SR": "structured report", "PR": "presentation state", "KO": "key object selection",
}
GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}


class ImageDecodeError(ValueError):
    """The image cannot be turned into model input; ``str()`` is a reason fit for a clinician."""


def read_dataset(source: str | Path | bytes) -> Dataset:
    """Read a DICOM Part 10 file (or bytes); a file without the 128-byte preamble is accepted.

    pydicom's warnings about malformed input are logged, not raised; a file with no readable element or
    with no SOP Class UID is refused, and so is a deflated dataset that would inflate beyond
    ``dicom.limits.MAX_INFLATED_BYTES`` (it is inflated within that bound, never by pydicom).
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = read_part10(data, force=not _has_preamble(data))
        except InputTooLarge as exc:
            raise ImageDecodeError(f"not a readable DICOM file: {exc}") from None
        except (InvalidDicomError, EOFError, struct.error, ValueError, TypeError, KeyError, OverflowError,
                NotImplementedError, MemoryError, BytesLengthException, zlib.error) as exc:
            raise ImageDecodeError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    for warning in caught:
        log.warning("malformed DICOM input: %s", warning.message)
    try:
        has_uid = bool(ds.get("SOPClassUID"))
    except Exception as exc:  # noqa: BLE001 - a lazily parsed element may be broken
        raise ImageDecodeError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if not has_uid:
        raise ImageDecodeError("not a readable DICOM file (no SOP Class UID)")
    return ds


def _has_preamble(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def check_radiograph_header(ds: Dataset) -> str | None:
    """See :func:`_check_radiograph_header`; a header element that cannot be read is a reason too."""
    try:
        return _check_radiograph_header(ds)
    except Exception as exc:  # noqa: BLE001 - lazily parsed elements fail in many ways
        return f"the DICOM header is damaged ({type(exc).__name__}: {exc})"


def _check_radiograph_header(ds: Dataset) -> str | None:
    """Why the header says this is not a plain radiograph we can analyse, or None if it may be one.

    Checks the SOP class, the modality and the photometric interpretation; the image content is judged
    later by the validity model.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if sop_class not in RADIOGRAPH_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name if sop_class else "missing"
        what = MODALITY_NAMES.get(modality, modality or "unknown modality")
        return f"{what} object ({name}) is not a plain radiograph; FractureNode analyses CR, DX and IO images"
    allowed = SC_MODALITIES if sop_class in SECONDARY_CAPTURE_SOP_CLASSES else RADIOGRAPH_MODALITIES
    if modality not in allowed:
        return f"modality {modality or '(empty)'} is not a radiograph modality ({', '.join(sorted(allowed - {''}))})"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "the object has no pixel data"
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        if photometric not in GRAYSCALE | COLOUR:
            return f"photometric interpretation {photometric or '(missing)'} is not supported"
    elif photometric not in GRAYSCALE:
        return f"photometric interpretation {photometric or '(missing)'} is not valid for a radiograph"
    return None


def _check_size(ds: Dataset) -> int:
    """The frame count, once the geometry is within the pixel cap and the decoded-bytes cap (dicom.limits):
    rows x columns x frames x samples x bytes per sample, so that multi-frame, colour or 32/64-bit data cannot
    get around the pixel cap. A palette is counted as the 3 samples it expands to."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (AttributeError, TypeError, ValueError, BytesLengthException) as exc:
        raise ImageDecodeError("image geometry (Rows/Columns/Number of Frames/Samples per Pixel/Bits Allocated) "
                               "is missing or invalid") from exc
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(f"image has no pixels ({rows}x{cols})")
    if frames > MAX_FRAMES:
        raise ImageDecodeError(f"{frames} frames of {cols}x{rows} pixels is more than FractureNode will decode")
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        samples = max(samples, 3)
    problem = decoded_size_problem(cols, rows, frames=frames, samples=samples, bytes_per_sample=(bits + 7) // 8)
    if problem:
        raise ImageDecodeError(problem)
    return frames


def _first_frame(ds: Dataset, frames: int) -> np.ndarray:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if frames > 1:
                from pydicom.pixels import pixel_array

                arr = pixel_array(ds, index=0)
            else:
                arr = ds.pixel_array
        for warning in caught:
            log.warning("while decoding pixel data: %s", warning.message)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - any decoder failure (even a Rust panic) rejects the image
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        where = f" ({getattr(syntax, 'name', syntax)})" if syntax is not None else ""
        raise ImageDecodeError(f"pixel data could not be decoded{where}: {exc}") from exc
    return np.asarray(arr)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2-3: window float32 ``values`` to [0, 1], in place (the caller's array is consumed: a
    2000 px image is 12 MB, and each temporary copy would add as much to the worker's peak memory)."""
    if function == "SIGMOID":
        values -= center
        values *= -4.0 / max(width, 1e-6)
        np.exp(values, out=values)
        values += 1.0
        return np.reciprocal(values, out=values)
    if function == "LINEAR_EXACT":
        values -= center
        values /= max(width, 1e-6)
    else:  # LINEAR
        width = max(width, 1.0)
        values -= center - 0.5
        values /= max(width - 1.0, 1e-6)
    values += 0.5
    return np.clip(values, 0.0, 1.0, out=values)


def _first_value(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return float(value[0]) if len(value) else None
    return float(value)  # type: ignore[arg-type]


def robust_normalise(values: np.ndarray) -> np.ndarray:
    """Map the 0.5-99.5 percentile range of float32 ``values`` to [0, 1], in place (used when the object carries
    no window)."""
    sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    values -= lo
    values /= hi - lo
    return np.clip(values, 0.0, 1.0, out=values)


def _modality_values(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """The Modality LUT (PS3.3 C.11.1) as a new float32 array: a linear rescale is applied in place on one
    float32 copy (pydicom's ``apply_modality_lut`` makes a float64 one, twice the size), a LUT by pydicom."""
    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    values = stored.astype(np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        if float(slope) != 1.0:
            values *= float(slope)
        if float(intercept) != 0.0:
            values += float(intercept)
    return values


def _voi(ds: Dataset, stored: np.ndarray, modality_values: np.ndarray) -> np.ndarray:
    """The VOI LUT or window to [0, 1] as float32; ``modality_values`` is consumed (windowed in place)."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        lut_input = stored if np.issubdtype(stored.dtype, np.integer) else np.rint(modality_values).astype(np.int32)
        try:
            out = apply_voi(lut_input, ds, index=0).astype(np.float32)
        except (NotImplementedError, AttributeError, ValueError, IndexError) as exc:
            raise ImageDecodeError(f"VOI LUT could not be applied: {exc}") from exc
        return np.clip(out / float(2**bits - 1), 0.0, 1.0)
    center = _first_value(ds.get("WindowCenter"))
    width = _first_value(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        return _window(modality_values, center, width, function)
    return robust_normalise(modality_values)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return (row, col)
    return None


def radiograph_from_dataset(ds: Dataset, source: str = "dicom") -> Radiograph:
    """Decode the first frame of ``ds`` into model input (see the module docstring for the steps).

    Any failure is an :class:`ImageDecodeError`: pydicom converts elements lazily, so a damaged element
    (wrong length, unknown VR, a value of the wrong multiplicity) fails wherever it is first read."""
    try:
        radiograph = _radiograph_from_dataset(ds, source)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise ImageDecodeError(f"the DICOM header is damaged ({type(exc).__name__}: {exc})") from exc
    if not np.isfinite(radiograph.pixels).all():
        raise ImageDecodeError("the rescale or window values give no finite pixel values")
    return radiograph


def _radiograph_from_dataset(ds: Dataset, source: str) -> Radiograph:
    frames = _check_size(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    arr = _first_frame(ds, frames)
    common = dict(pixel_spacing_mm=_pixel_spacing(ds), modality=str(ds.get("Modality", "")) or None,
                  sop_class_uid=str(ds.get("SOPClassUID", "")) or None, photometric_interpretation=photometric,
                  body_part=str(ds.get("BodyPartExamined", "")) or None,
                  laterality=str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")) or None, source=source)
    if photometric in COLOUR:
        if photometric == "PALETTE COLOR":
            from pydicom.pixels.processing import apply_color_lut

            try:
                rgb = apply_color_lut(arr, ds)
            except (ValueError, AttributeError, IndexError, KeyError) as exc:
                raise ImageDecodeError(f"palette colour image without a usable palette: {exc}") from exc
        else:  # pydicom converts YBR to RGB while decoding
            rgb = arr
        rgb = _to_uint8(np.asarray(rgb))
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ImageDecodeError(f"colour pixel data has an unexpected shape {rgb.shape}")
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        return Radiograph(pixels=gray, rgb=rgb, **common)  # type: ignore[arg-type]
    if photometric not in GRAYSCALE:
        raise ImageDecodeError(f"photometric interpretation {photometric or '(missing)'} is not supported")
    if arr.ndim != 2:
        raise ImageDecodeError(f"grayscale pixel data has an unexpected shape {arr.shape}")
    pixels = _voi(ds, arr, _modality_values(ds, arr))
    if photometric == "MONOCHROME1":
        np.subtract(1.0, pixels, out=pixels)
    return Radiograph(pixels=np.ascontiguousarray(pixels, dtype=np.float32), **common)  # type: ignore[arg-type]


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    top = float(arr.max()) if arr.size else 1.0
    scale = 255.0 / (65535.0 if top > 255 else 255.0)
    return np.clip(arr.astype(np.float32) * scale, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ PNG / JPEG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(data: bytes) -> str | None:
    """``"dicom"``, ``"png"``, ``"jpeg"`` or None, from the content's magic bytes (never the file name)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if _has_preamble(data):
        return "dicom"
    # Part 10 without preamble: starts with the (0002,xxxx) file meta group, or (0008,xxxx) raw dataset
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[2:4] < b"\x20\x00":
        return "dicom"
    return None


#: PNG colour type -> channels OpenCV decodes it to (IMREAD_UNCHANGED; a palette may gain an alpha channel).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG or JPEG header without decoding the pixels, or None if not found."""
    header = image_header(data)
    return None if header is None else (header[0], header[1])


def image_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, channels, bytes per sample) of the decoded image, from a PNG IHDR or a JPEG SOF header
    without decoding the pixels, or None if not found. Conservative: what OpenCV may allocate for it."""
    if data.startswith(PNG_MAGIC) and len(data) >= 26 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        bit_depth, colour_type = data[24], data[25]
        return int(width), int(height), _PNG_CHANNELS.get(colour_type, 4), 2 if bit_depth > 8 else 1
    if data.startswith(JPEG_MAGIC):
        pos = 2
        while pos + 9 < len(data):
            if data[pos] != 0xFF:
                pos += 1
                continue
            marker = data[pos + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                precision = data[pos + 4]
                height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
                return int(width), int(height), max(1, min(data[pos + 9], 4)), 2 if precision > 8 else 1
            pos += 2 + length
    return None


def radiograph_from_image_bytes(data: bytes, source: str = "upload") -> Radiograph:
    """Decode a PNG (8/16-bit, gray or colour) or JPEG into model input, refusing decompression bombs: the
    header's size, channels and depth are checked against the pixel and decoded-bytes caps (dicom.limits)
    before anything is decoded."""
    kind = sniff_format(data)
    if kind not in ("png", "jpeg"):
        raise ImageDecodeError("not a PNG or JPEG image")
    header = image_header(data)
    if header is None:
        raise ImageDecodeError(f"the {kind.upper()} header is damaged (no image size found)")
    width, height, channels, depth = header
    problem = decoded_size_problem(width, height, samples=channels, bytes_per_sample=depth)
    if problem or width == 0 or height == 0:
        raise ImageDecodeError(f"the {kind.upper()} is outside the accepted size: "
                               + (problem or f"image of {width}x{height} pixels"))
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageDecodeError(f"the {kind.upper()} image is truncated or corrupt")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 3:
        rgb = _to_uint8(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB))
        spread = np.abs(rgb.astype(np.int16) - rgb.mean(axis=2, keepdims=True).astype(np.int16)).max()
        if spread <= 2:  # grayscale stored as colour: keep the gray values at full depth
            arr = arr[:, :, 0]
        else:
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
            return Radiograph(pixels=gray, rgb=rgb, photometric_interpretation="RGB", source=source)
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    pixels = arr.astype(np.float32) / scale
    return Radiograph(pixels=pixels, photometric_interpretation="MONOCHROME2", source=source)


def load_radiograph(source: str | Path | bytes) -> Radiograph:
    """Decode a DICOM, PNG or JPEG file (path or bytes) into model input."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    kind = sniff_format(data)
    if kind in ("png", "jpeg"):
        return radiograph_from_image_bytes(data, source="file")
    ds = read_dataset(data)
    return radiograph_from_dataset(ds, source="dicom")
