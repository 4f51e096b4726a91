"""Dataset (and PNG/JPEG) to model input: LUTs, photometry, multi-frame, compression, hostile input."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from dicom.image import (
    ImageDecodeError,
    check_radiograph_header,
    image_dimensions,
    load_radiograph,
    radiograph_from_dataset,
    radiograph_from_image_bytes,
    read_dataset,
    sniff_format,
)


def make_dataset(pixels: np.ndarray, *, sop_class: str = DigitalXRayImageStorageForPresentation,
                 modality: str = "DX", photometric: str = "MONOCHROME2", bits_stored: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = modality, "P1"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def ramp(rows: int = 64, cols: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 4095, cols, dtype=np.float64), (rows, 1)).astype(np.uint16)


def test_window_and_monochrome1_make_bone_bright() -> None:
    ds = make_dataset(ramp())
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    mono2 = radiograph_from_dataset(ds).pixels
    assert mono2.dtype == np.float32 and mono2.shape == (64, 64)
    assert mono2[0, 0] < 0.01 and mono2[0, -1] > 0.99
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = radiograph_from_dataset(ds).pixels
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_modality_lut_is_applied_before_the_window() -> None:
    ds = make_dataset(ramp())
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    ds.WindowCenter, ds.WindowWidth = 0, 200  # only stored values near 500 fall inside the window
    pixels = radiograph_from_dataset(ds).pixels
    column = int(np.argmin(np.abs(np.linspace(0, 4095, 64) * 2 - 1000)))
    assert 0.2 < pixels[0, column] < 0.8
    assert pixels[0, 0] == 0.0 and pixels[0, -1] == 1.0


def test_sigmoid_and_voi_lut_sequence() -> None:
    ds = make_dataset(ramp())
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 1000, "SIGMOID"
    pixels = radiograph_from_dataset(ds).pixels
    assert abs(float(pixels[0, 32]) - 0.5) < 0.1
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = [65535 - v * 16 for v in range(4096)]  # an inverting LUT
    del ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction
    ds.VOILUTSequence = [lut]
    pixels = radiograph_from_dataset(ds).pixels
    assert pixels[0, 0] > 0.99 and pixels[0, -1] < 0.01


def test_no_window_uses_robust_percentiles_and_keeps_spacing() -> None:
    ds = make_dataset(ramp())
    ds.ImagerPixelSpacing = [0.15, 0.15]
    radiograph = radiograph_from_dataset(ds)
    assert radiograph.pixels.min() == 0.0 and radiograph.pixels.max() == 1.0
    assert radiograph.pixel_spacing_mm == (0.15, 0.15)
    assert radiograph.modality == "DX"


def test_multiframe_uses_the_first_frame() -> None:
    frames = np.stack([ramp(), np.full((64, 64), 4095, np.uint16)])
    ds = make_dataset(frames)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    pixels = radiograph_from_dataset(ds).pixels
    assert pixels[0, 0] < 0.01  # the ramp, not the white second frame


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_decode_to_the_same_pixels(syntax: str) -> None:
    ds = make_dataset(ramp(32, 48))
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    expected = radiograph_from_dataset(ds).pixels
    ds.compress(syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    decoded = radiograph_from_dataset(read_dataset(buffer.getvalue())).pixels
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_header_check_names_what_is_wrong() -> None:
    assert check_radiograph_header(make_dataset(ramp())) is None
    ct = check_radiograph_header(make_dataset(ramp(), sop_class=CTImageStorage, modality="CT"))
    assert ct is not None and "CT" in ct and "not a plain radiograph" in ct
    wrong_modality = check_radiograph_header(make_dataset(ramp(), modality="MG"))
    assert wrong_modality is not None and "MG" in wrong_modality
    rgb_dx = make_dataset(ramp(), photometric="RGB")
    assert "not valid for a radiograph" in (check_radiograph_header(rgb_dx) or "")
    no_pixels = make_dataset(ramp())
    del no_pixels.PixelData
    assert check_radiograph_header(no_pixels) == "the object has no pixel data"


def test_corrupt_and_absurd_pixel_data_are_refused_with_a_reason() -> None:
    truncated = make_dataset(ramp())
    truncated.PixelData = truncated.PixelData[:100]
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        radiograph_from_dataset(truncated)
    huge = make_dataset(ramp())
    huge.Rows, huge.Columns = 60000, 60000
    with pytest.raises(ImageDecodeError, match="pixel limit"):
        radiograph_from_dataset(huge)
    empty = make_dataset(ramp())
    empty.Rows = 0
    with pytest.raises(ImageDecodeError, match="no pixels"):
        radiograph_from_dataset(empty)
    with pytest.raises(ImageDecodeError, match="not a readable DICOM"):
        read_dataset(b"\x00" * 128 + b"DICM" + b"\xff" * 40)


def test_png_and_jpeg() -> None:
    gray16 = (ramp(40, 50).astype(np.uint32) * 16).astype(np.uint16)
    ok, png16 = cv2.imencode(".png", gray16)
    assert ok
    data = png16.tobytes()
    assert sniff_format(data) == "png" and image_dimensions(data) == (50, 40)
    radiograph = radiograph_from_image_bytes(data)
    assert radiograph.rgb is None and radiograph.pixels.max() > 0.99
    ok, jpeg = cv2.imencode(".jpg", (ramp(40, 50) // 16).astype(np.uint8))
    assert image_dimensions(jpeg.tobytes()) == (50, 40)
    assert load_radiograph(jpeg.tobytes()).pixels.shape == (40, 50)
    photo = np.zeros((40, 50, 3), np.uint8)
    photo[..., 2] = 200  # strongly red in BGR order
    ok, colour = cv2.imencode(".png", photo)
    colour_radiograph = radiograph_from_image_bytes(colour.tobytes())
    assert colour_radiograph.rgb is not None and colour_radiograph.rgb[0, 0, 0] == 200


def test_truncated_and_bomb_images_are_refused() -> None:
    ok, png = cv2.imencode(".png", np.full((64, 64), 128, np.uint8))
    data = png.tobytes()
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        radiograph_from_image_bytes(data[: len(data) // 2])
    bomb = bytearray(data)
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # claims 100000 x 100000 pixels
    with pytest.raises(ImageDecodeError, match="outside the accepted size"):
        radiograph_from_image_bytes(bytes(bomb))
    with pytest.raises(ImageDecodeError, match="not a PNG or JPEG"):
        radiograph_from_image_bytes(b"GIF89a....")


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rescale_and_window_match_pydicom(make_dicom, function: str, photometric: str) -> None:  # type: ignore[no-untyped-def]
    """Decoding rescales and windows in place, in float32; the values are PS3.3's, as pydicom computes them."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = make_dicom(photometric=photometric, RescaleSlope="0.5", RescaleIntercept="-100", WindowCenter="700",
                      WindowWidth="1500", VOILUTFunction=function)
    ds = read_dataset(path)
    pixels = radiograph_from_dataset(ds).pixels
    assert pixels.dtype == np.float32
    # pydicom windows to the rescaled range of the 12-bit stored values, [0 * 0.5 - 100, 4095 * 0.5 - 100]
    expected = (apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) + 100.0) / (4095 * 0.5)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert 0.05 < float(expected.std())  # the window keeps contrast: the comparison means something
    np.testing.assert_allclose(pixels, expected, atol=2e-5)


def test_without_a_window_the_robust_range_maps_to_unit_interval(make_dicom) -> None:  # type: ignore[no-untyped-def]
    ds = read_dataset(make_dicom(RescaleSlope="2", RescaleIntercept="10"))
    pixels = radiograph_from_dataset(ds).pixels
    values = ds.pixel_array.astype(np.float64) * 2 + 10
    lo, hi = np.percentile(values, [0.5, 99.5])  # a 256 px image: the sample is every pixel
    np.testing.assert_allclose(pixels, np.clip((values - lo) / (hi - lo), 0, 1), atol=1e-5)
