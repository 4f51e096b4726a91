"""Hostile input: hypothesis fuzzes the DICOM decode path (``dicom.image``), the HTTP upload path
(``service.ingest.ingest_upload``) and the C-STORE path (``service.ingest.ingest``, what the listener's
handler calls with the bytes as received).

Every case must end in a result or in one of our typed rejections (:class:`dicom.image.ImageDecodeError`,
:class:`service.ingest.IngestError`): never another exception, never a hang (a per-case alarm), never a large
allocation (a per-case ``tracemalloc`` peak limit; the inputs are a few kB, so anything near the limit means a
size field was believed).

Inputs are small valid objects (DX, CR MONOCHROME1 with a window and a rescale, multi-frame, RLE, JPEG 2000,
deflated, no preamble, PNG, JPEG) put through mutations: truncation, flipped and inserted bytes, absurd values
in Rows/Columns/NumberOfFrames/BitsAllocated/SamplesPerPixel and friends, corrupted element lengths and VRs,
damaged preambles, and PNG/JPEG headers that lie about their size.

The CI run is bounded (``FRACTURE_FUZZ_EXAMPLES``, default 300 cases per decode target and 60 per ingest
target and engine, derandomised so CI is repeatable). The release run (see SECURITY.md) is e.g.::

    FRACTURE_FUZZ_EXAMPLES=20000 FRACTURE_FUZZ_RANDOM=1 nice .venv/bin/pytest tests/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from config import Settings
from dicom.image import (
    ImageDecodeError,
    check_radiograph_header,
    load_radiograph,
    radiograph_from_dataset,
    radiograph_from_image_bytes,
    read_dataset,
)
from dicom.limits import InputTooLarge, inflate_deflated
from dicom.status import store_failure_status
from pipeline.types import Radiograph
from service.db import Database
from service.ingest import InflatedTooLarge, IngestError, UnreadableImage, ingest, ingest_upload
from tests.conftest import make_dx_dataset

EXAMPLES = int(os.environ.get("FRACTURE_FUZZ_EXAMPLES", "300"))
#: The ingest paths write to a real database (both engines): a fifth as many cases each.
INGEST_EXAMPLES = max(10, EXAMPLES // 5)
CASE_SECONDS = float(os.environ.get("FRACTURE_FUZZ_CASE_SECONDS", "15"))
#: Largest traced allocation peak allowed for one case. The caps of dicom.limits (40 MP a frame, 80 MB decoded,
#: 96 MB inflated) bound what a header can make the decoders allocate from a small input (see
#: test_small_png_claiming_64_megapixels_is_refused); anything beyond this limit means a size field was
#: believed with no cap at all.
PEAK_LIMIT = int(os.environ.get("FRACTURE_FUZZ_PEAK_MB", "768")) * 1024 * 1024
#: What a small input may cost once the caps match the node's 512 MB memory budget.
SMALL_INPUT_BUDGET = 128 * 1024 * 1024

FUZZ = hypothesis_settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    derandomize=os.environ.get("FRACTURE_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
FUZZ_INGEST = hypothesis_settings(FUZZ, max_examples=INGEST_EXAMPLES)


# ------------------------------------------------------------------------------------------ the guard


class CaseTimeout(BaseException):
    """Raised by the per-case alarm: a BaseException, so no ``except Exception`` in the code can swallow it."""


@dataclass
class Outcome:
    peak: int = 0
    seconds: float = 0.0


@contextmanager
def guarded() -> Iterator[Outcome]:
    """Run one case under an alarm and ``tracemalloc``; the caller asserts on the outcome afterwards."""
    outcome = Outcome()

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise CaseTimeout(f"case ran longer than {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    tracemalloc.start()
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        yield outcome
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        outcome.seconds = time.monotonic() - started
        outcome.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _expect_clean(call: Callable[[], object], allowed: tuple[type[BaseException], ...]) -> str:
    """Run ``call`` guarded; it must return or raise one of ``allowed``. Returns what happened (for notes).

    Warnings are not errors here (they are not in production); a decoded radiograph must be finite."""
    with guarded() as outcome, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = call()
            what = "accepted"
        except allowed as exc:
            result, what = None, f"refused: {type(exc).__name__}: {str(exc)[:120]}"
    if isinstance(result, Radiograph):
        assert np.isfinite(result.pixels).all(), "decoded pixels contain NaN or infinity"
    note(f"{what} in {outcome.seconds:.2f} s, peak {outcome.peak / 1e6:.1f} MB")
    assert outcome.peak <= PEAK_LIMIT, f"allocated {outcome.peak / 1e6:.0f} MB for a small input ({what})"
    return what


# ------------------------------------------------------------------------------------------ the seeds

SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
CR = "1.2.840.10008.5.1.4.1.1.1"


def _encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    buffer = io.BytesIO()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _small_dx(**changes: object) -> Dataset:
    ds = make_dx_dataset(rows=32, columns=24)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _seed_datasets() -> dict[str, Dataset]:
    seeds: dict[str, Dataset] = {"dx": _small_dx()}
    cr = _small_dx(SOPClassUID=CR, Modality="CR", PhotometricInterpretation="MONOCHROME1", WindowCenter=2048,
                   WindowWidth=4096, RescaleSlope=1, RescaleIntercept=0, VOILUTFunction="SIGMOID",
                   ImagerPixelSpacing=[0.15, 0.15])
    cr.file_meta.MediaStorageSOPClassUID = CR
    seeds["cr"] = cr
    frames = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    multi = _small_dx(SOPClassUID=SC_MULTIFRAME_WORD, Modality="OT", Rows=16, Columns=16, NumberOfFrames=3,
                      PixelData=frames.tobytes())
    multi.file_meta.MediaStorageSOPClassUID = SC_MULTIFRAME_WORD
    seeds["multiframe"] = multi
    rle = _small_dx()
    rle.compress(RLELossless, rle.pixel_array)
    seeds["rle"] = rle
    j2k = make_dx_dataset(rows=64, columns=64)  # OpenJPEG needs a few resolution levels
    j2k.compress(JPEG2000Lossless, j2k.pixel_array)
    seeds["j2k"] = j2k
    return seeds


def _seed_bytes() -> dict[str, bytes]:
    seeds = {name: _encode(ds) for name, ds in _seed_datasets().items()}
    seeds["implicit-no-preamble"] = _encode(_small_dx(), implicit=True)[132:]
    deflated = _small_dx()
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    seeds["deflated"] = _encode(deflated)
    return seeds


def _png16() -> bytes:
    ok, png = cv2.imencode(".png", (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80))
    assert ok
    return png.tobytes()


def _jpeg() -> bytes:
    ok, jpeg = cv2.imencode(".jpg", np.tile(np.arange(32, dtype=np.uint8) * 8, (24, 1)))
    assert ok
    return jpeg.tobytes()


DICOM_SEEDS = _seed_bytes()
IMAGE_SEEDS = {"png": _png16(), "jpeg": _jpeg()}

# ---------------------------------------------------------------------------------- header mutations

#: Elements whose values are believed by decoders, with absurd replacements (US: 0..65535; others strings).
GEOMETRY_TAGS = {
    "Rows": (0x0028, 0x0010), "Columns": (0x0028, 0x0011), "BitsAllocated": (0x0028, 0x0100),
    "BitsStored": (0x0028, 0x0101), "HighBit": (0x0028, 0x0102), "SamplesPerPixel": (0x0028, 0x0002),
    "PixelRepresentation": (0x0028, 0x0103), "PlanarConfiguration": (0x0028, 0x0006),
}
US_VALUES = st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 33, 64, 255, 4096, 8000, 8944, 32767, 65535])
STRING_EDITS: dict[str, st.SearchStrategy[str]] = {
    "NumberOfFrames": st.sampled_from(["0", "-1", "2", "4", "1024", "1025", "999999999", "2147483648", "x", "1e9"]),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422",
                                                  "YBR_RCT", "", "HSV", "\x00\x00"]),
    "WindowCenter": st.sampled_from(["0", "-1e308", "1e308", "nan", "inf", "abc", "1\\2\\3"]),
    "WindowWidth": st.sampled_from(["0", "-5", "1e-308", "1e308", "nan", "", "1\\"]),
    "RescaleSlope": st.sampled_from(["0", "-1", "1e308", "nan", "inf", "x"]),
    "RescaleIntercept": st.sampled_from(["-1e308", "1e308", "nan"]),
    "VOILUTFunction": st.sampled_from(["SIGMOID", "LINEAR_EXACT", "BOGUS", ""]),
    "SOPClassUID": st.sampled_from(["", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7", "1." * 40,
                                    "../../etc/passwd"]),
    "SOPInstanceUID": st.sampled_from(["", "../../../etc/passwd", "1." * 40, "1.2.3\\4", "/abs/path", "a" * 64]),
    "StudyInstanceUID": st.sampled_from(["", "..", "1." * 33, "x/y"]),
    "PatientName": st.text(max_size=80),
    "PatientID": st.text(max_size=80),
    "ImagerPixelSpacing": st.sampled_from(["0\\0", "-1\\1", "nan\\nan", "1", "a\\b"]),
}


#: Text elements and where they live, written as raw bytes so that invalid values reach the decoder as a
#: real sender's would (pydicom refuses to write most of them).
STRING_TAGS = {
    "NumberOfFrames": (0x0028, 0x0008, "IS"), "PhotometricInterpretation": (0x0028, 0x0004, "CS"),
    "WindowCenter": (0x0028, 0x1050, "DS"), "WindowWidth": (0x0028, 0x1051, "DS"),
    "RescaleSlope": (0x0028, 0x1053, "DS"), "RescaleIntercept": (0x0028, 0x1052, "DS"),
    "VOILUTFunction": (0x0028, 0x1056, "CS"), "SOPClassUID": (0x0008, 0x0016, "UI"),
    "SOPInstanceUID": (0x0008, 0x0018, "UI"), "StudyInstanceUID": (0x0020, 0x000D, "UI"),
    "PatientName": (0x0010, 0x0010, "PN"), "PatientID": (0x0010, 0x0020, "LO"),
    "ImagerPixelSpacing": (0x0018, 0x1164, "DS"),
}


@st.composite
def dataset_edits(draw: st.DrawFn) -> list[tuple[str, object]]:
    edits: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            edits.append((draw(st.sampled_from(sorted(GEOMETRY_TAGS))), draw(US_VALUES)))
        else:
            keyword = draw(st.sampled_from(sorted(STRING_EDITS)))
            edits.append((keyword, draw(STRING_EDITS[keyword])))
    if draw(st.integers(0, 9)) == 0:
        edits.append(("-delete", draw(st.sampled_from(["PixelData", "Rows", "SOPClassUID", "StudyInstanceUID",
                                                        "PhotometricInterpretation", "BitsAllocated"]))))
    return edits


def _placeholder(vr: str) -> object:
    return {"IS": "1", "DS": "1", "UI": "1.2"}.get(vr, "X")


def _apply_edits(ds: Dataset, edits: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Apply numeric edits and deletions to ``ds``; put placeholders for text edits (patched in the bytes
    later) and return those."""
    patches = []
    for keyword, value in edits:
        if keyword == "-delete":
            if str(value) in ds:
                delattr(ds, str(value))
        elif keyword in GEOMETRY_TAGS:
            ds.add_new(Tag(*GEOMETRY_TAGS[keyword]), "US", value)
        else:
            group, element, vr = STRING_TAGS[keyword]
            ds.add_new(Tag(group, element), vr, _placeholder(vr))
            patches.append((keyword, value))
    return patches


def _patch_text(data: bytes, keyword: str, value: str) -> bytes:
    """Replace the value of an explicit VR little endian text element (2-byte length) in encoded bytes."""
    group, element, vr = STRING_TAGS[keyword]
    head = struct.pack("<HH", group, element) + vr.encode()
    at = data.find(head, 132 if group != 0x0002 else 0)
    if at < 0:
        return data
    (length,) = struct.unpack("<H", data[at + 6:at + 8])
    raw = value.encode("utf-8", "surrogatepass")[:0xFFFE]
    if len(raw) % 2:
        raw += b" "
    return data[:at + 6] + struct.pack("<H", len(raw)) + raw + data[at + 8 + length:]


# ------------------------------------------------------------------------------------- byte mutations

Mutation = tuple[str, int, bytes]


@st.composite
def byte_mutations(draw: st.DrawFn) -> list[Mutation]:
    kinds = st.sampled_from(["truncate", "flip", "insert", "length", "vr", "preamble", "zero-tail"])
    out: list[Mutation] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(kinds)
        position = draw(st.integers(0, 1 << 20))
        if kind == "length":
            payload = struct.pack("<I", draw(st.sampled_from([0, 1, 3, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF,
                                                               0x00010000, 0x10000000])))
        elif kind == "vr":
            payload = draw(st.sampled_from([b"SQ", b"OB", b"UN", b"UT", b"OW", b"FD", b"AT", b"US", b"XX",
                                            b"\x00\x00", b"\xff\xff"]))
        elif kind == "preamble":
            payload = draw(st.sampled_from([b"", b"DICM", b"\x00" * 132, b"DICM" * 40, b"\x00" * 128 + b"DIC"]))
        else:
            payload = draw(st.binary(min_size=1, max_size=16))
        out.append((kind, position, payload))
    return out


_ELEMENT_HEADS = [struct.pack("<HH", group, element) for group, element in
                  [(0x0002, 0x0010), (0x0008, 0x0016), (0x0008, 0x0018), (0x0020, 0x000D), (0x0028, 0x0010),
                   (0x0028, 0x0011), (0x0028, 0x0100), (0x7FE0, 0x0010), (0x0010, 0x0010)]]


def _mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    buffer = bytearray(data)
    for kind, position, payload in mutations:
        if not buffer:
            break
        at = position % len(buffer)
        if kind == "truncate":
            del buffer[at:]
        elif kind == "flip":
            buffer[at:at + len(payload)] = payload
        elif kind == "insert":
            buffer[at:at] = payload
        elif kind == "zero-tail":
            buffer[at:] = bytes(len(buffer) - at)
        elif kind in ("length", "vr"):
            # aim at a real element: the tag, then (explicit VR) 2 bytes of VR and 2 or 4 bytes of length
            head = _ELEMENT_HEADS[position % len(_ELEMENT_HEADS)]
            found = bytes(buffer).find(head)
            if found < 0:
                continue
            if kind == "vr":
                buffer[found + 4:found + 6] = payload
            else:
                vr = bytes(buffer[found + 4:found + 6])
                offset = found + 8 if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC", b"UR") else found + 4
                buffer[offset:offset + 4] = payload
        elif kind == "preamble":
            buffer[0:132] = payload
    return bytes(buffer)


@st.composite
def hostile_dicom(draw: st.DrawFn) -> bytes:
    """A seed with header edits (re-encoded) and byte mutations."""
    name = draw(st.sampled_from(sorted(DICOM_SEEDS)))
    edits = draw(dataset_edits())
    data = DICOM_SEEDS[name]
    if edits and name not in ("implicit-no-preamble", "deflated"):
        ds = _seed_datasets()[name] if name in ("rle", "j2k") else read_dataset(data)
        patches = _apply_edits(ds, edits)
        try:
            with _lenient_writing():
                data = _encode(ds)
        except Exception:  # noqa: BLE001 - pydicom refused to write the edit; keep the seed
            data, patches = DICOM_SEEDS[name], []
        for keyword, value in patches:
            data = _patch_text(data, keyword, str(value))
    mutations = draw(byte_mutations())
    note(f"seed {name}, edits {edits}, mutations {[(k, p, v[:8]) for k, p, v in mutations]}")
    return _mutate(data, mutations)


@contextmanager
def _lenient_writing() -> Iterator[None]:
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = previous


@st.composite
def hostile_image(draw: st.DrawFn) -> bytes:
    """A PNG or JPEG whose header lies (dimensions, bit depth, colour type) or whose body is damaged."""
    kind = draw(st.sampled_from(["png", "jpeg"]))
    data = bytearray(IMAGE_SEEDS[kind])
    if kind == "png" and draw(st.booleans()):
        width = draw(st.sampled_from([0, 1, 8000, 8944, 16384, 16385, 100_000, 0x7FFFFFFF, 0xFFFFFFFF]))
        height = draw(st.sampled_from([0, 1, 8000, 8944, 16384, 100_000, 0xFFFFFFFF]))
        data[16:24] = struct.pack(">II", width, height)
        data[24] = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))  # bit depth
        data[25] = draw(st.sampled_from([0, 2, 3, 4, 6, 7]))  # colour type
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # a valid IHDR CRC: the lie is believed
    if kind == "jpeg" and draw(st.booleans()):
        sof = bytes(data).find(b"\xff\xc0")
        if sof > 0:
            data[sof + 5:sof + 9] = struct.pack(">HH", draw(st.sampled_from([0, 1, 8000, 65535])),
                                                draw(st.sampled_from([0, 1, 8000, 65535])))
    return _mutate(bytes(data), draw(byte_mutations()))


def png_bomb(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A valid PNG of zeros: a few kB on the wire, ``width*height`` pixels once decoded."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(width * channels * bit_depth // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def deflate_bomb(expanded_mb: int) -> bytes:
    """A Deflated Explicit VR Little Endian DX whose few-hundred-kB dataset inflates to ``expanded_mb`` MB."""
    ds = _small_dx()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.add_new(Tag(0x0009, 0x0010), "LO", "FUZZ")
    ds.add_new(Tag(0x0009, 0x1000), "OB", bytes(expanded_mb * 1024 * 1024))
    return _encode(ds)


# ---------------------------------------------------------------------------------------------- tests

DECODE_ERRORS = (ImageDecodeError,)


def _worker_decode(data: bytes) -> Radiograph | None:
    """What a worker does with a stored instance: read, check the header, decode the first frame."""
    ds = read_dataset(data)
    if check_radiograph_header(ds) is None:
        return radiograph_from_dataset(ds)
    return None


@FUZZ
@given(data=hostile_dicom())
def test_dicom_decode_path_rejects_hostile_objects_cleanly(data: bytes) -> None:
    _expect_clean(lambda: load_radiograph(data), DECODE_ERRORS)
    _expect_clean(lambda: _worker_decode(data), DECODE_ERRORS)


@FUZZ
@given(data=st.one_of(hostile_image(), st.binary(max_size=256).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
                      st.binary(max_size=256).map(lambda tail: b"\xff\xd8\xff" + tail)))
def test_png_and_jpeg_decode_path_rejects_hostile_images_cleanly(data: bytes) -> None:
    _expect_clean(lambda: radiograph_from_image_bytes(data), DECODE_ERRORS)
    _expect_clean(lambda: load_radiograph(data), DECODE_ERRORS)


@FUZZ_INGEST
@given(data=hostile_dicom())
def test_c_store_ingest_rejects_hostile_objects_cleanly(settings: Settings, db: Database, data: bytes) -> None:
    what = _expect_clean(lambda: ingest(db, settings, data, calling_ae="FUZZER", peer_address="127.0.0.1"),
                         (IngestError,))
    _assert_store_is_consistent(settings, db)
    note(what)


@FUZZ_INGEST
@given(data=st.one_of(hostile_image(), hostile_dicom()),
       content_type=st.sampled_from([None, "application/dicom", "image/png", "image/jpeg", "application/octet-stream",
                                     "text/html", "image/png; charset=../../x", "image/svg+xml"]),
       filename=st.sampled_from([None, "../../../etc/passwd", "..\\..\\boot.ini", "/etc/shadow", "x\x00.png",
                                 "<script>alert(1)</script>.png", "a" * 1000]))
def test_upload_path_rejects_hostile_files_cleanly(settings: Settings, db: Database, data: bytes,
                                                   content_type: str | None, filename: str | None) -> None:
    _expect_clean(lambda: ingest_upload(db, settings, data, content_type=content_type, filename=filename,
                                        remote_addr="127.0.0.1"), (IngestError,))
    _assert_store_is_consistent(settings, db)


def _count_instances(db: Database) -> int:
    from sqlalchemy import func, select

    from service.models import Instance

    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _assert_store_is_consistent(settings: Settings, db: Database) -> None:
    """Every stored file is recorded, every recorded file exists inside the store, no temp file is left."""
    from sqlalchemy import select

    from service.models import Instance

    store = settings.storage_dir.resolve()
    files = {p.resolve() for p in store.rglob("*") if p.is_file()}
    with db.session() as session:
        recorded = {os.path.realpath(p) for p in session.scalars(select(Instance.file_path))}
    assert {str(p) for p in files} == recorded
    assert all(path.startswith(str(store) + os.sep) for path in recorded)
    assert not [p for p in files if ".tmp" in p.parts]


# ------------------------------------------------------------------------------ targeted hostile cases


@pytest.mark.parametrize(("width", "height", "bit_depth", "colour_type"), [
    (100_000, 100_000, 8, 0),  # 10 GP: refused from the header
    (20_000, 20_000, 1, 0),  # 400 MP of 1-bit pixels: a 50 kB file
])
def test_png_decompression_bombs_are_refused_before_decoding(settings: Settings, db: Database, width: int,
                                                             height: int, bit_depth: int, colour_type: int) -> None:
    bomb = png_bomb(width, height, bit_depth=bit_depth, colour_type=colour_type) if width * height < 1e9 else (
        png_bomb(16, 16)[:16] + struct.pack(">II", width, height) + png_bomb(16, 16)[24:])
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageDecodeError), guarded() as outcome:
        radiograph_from_image_bytes(bomb)
    assert outcome.peak < PEAK_LIMIT
    with pytest.raises(IngestError), guarded() as outcome:
        ingest_upload(db, settings, bomb, content_type="image/png")
    assert outcome.peak < PEAK_LIMIT


def test_zero_size_pixel_data_and_no_preamble_junk_are_refused(settings: Settings, db: Database) -> None:
    empty = _small_dx(PixelData=b"")
    with pytest.raises(ImageDecodeError):
        load_radiograph(_encode(empty))
    for junk in (b"", b"DICM", b"\x00" * 132, b"\x00" * 128 + b"DICM", b"\x02\x00\x10\x00UI\xff\xff"):
        with pytest.raises(ImageDecodeError):
            load_radiograph(junk)
        with pytest.raises(IngestError):
            ingest(db, settings, junk)
    _assert_store_is_consistent(settings, db)


def test_small_png_claiming_64_megapixels_is_refused(settings: Settings, db: Database) -> None:
    """Was F5 (SECURITY.md): with 80/64 MP caps a ~60 kB PNG of 8000x8000 zeros was decoded, costing ~0.6 GB
    in the decoder alone, more than the node's whole 512 MB budget. The cap is now 40 MP (dicom.limits)."""
    bomb = png_bomb(8000, 8000)
    assert len(bomb) < 200_000
    with guarded() as outcome, pytest.raises(ImageDecodeError, match="40,000,000 pixel limit"):
        radiograph_from_image_bytes(bomb)
    assert outcome.peak < SMALL_INPUT_BUDGET, f"{outcome.peak / 1e6:.0f} MB for a {len(bomb) / 1e3:.0f} kB file"
    with guarded() as outcome, pytest.raises(UnreadableImage, match="larger than allowed"):
        ingest_upload(db, settings, bomb, content_type="image/png")
    assert outcome.peak < SMALL_INPUT_BUDGET, f"{outcome.peak / 1e6:.0f} MB for a {len(bomb) / 1e3:.0f} kB file"


def _png_header(width: int, height: int, *, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose (valid-CRC) IHDR claims ``width x height`` over a tiny body."""
    data = bytearray(png_bomb(16, 16))
    data[16:26] = struct.pack(">IIBB", width, height, bit_depth, colour_type)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_png_under_the_pixel_cap_but_over_the_byte_cap_is_refused_before_decoding(settings: Settings,
                                                                                   db: Database) -> None:
    """25 MP of 8-bit RGBA decode to 100 MB: within the 40 MP pixel cap, beyond the 80 MB decoded-bytes cap."""
    bomb = _png_header(5000, 5000, bit_depth=8, colour_type=6)
    with guarded() as outcome, pytest.raises(ImageDecodeError, match="more than the 80 MB limit"):
        radiograph_from_image_bytes(bomb)
    assert outcome.peak < SMALL_INPUT_BUDGET
    with guarded() as outcome, pytest.raises(UnreadableImage, match="80 MB decoded"):
        ingest_upload(db, settings, bomb, content_type="image/png")
    assert outcome.peak < SMALL_INPUT_BUDGET
    # the same pixels in 8-bit grey are within both caps (and fail later, on the missing pixel data)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        radiograph_from_image_bytes(_png_header(5000, 5000, bit_depth=8, colour_type=0))


@pytest.mark.parametrize(("rows", "columns", "frames", "bits", "samples"), [
    (1024, 1024, 50, 16, 1),  # 50 frames of 2 MB: 100 MB
    (6000, 6000, 1, 32, 1),  # 36 MP (within the pixel cap) of 32-bit samples: 144 MB
    (4000, 4000, 1, 64, 1),  # 16 MP of 64-bit samples: 128 MB
    (4000, 4000, 1, 16, 3),  # 16 MP of 16-bit RGB: 96 MB
    (2048, 2048, 12, 8, 1),  # 12 frames of 4 MB: 48 MB, within the caps: decoded (here: refused as truncated)
])
def test_multi_frame_and_deep_pixel_data_are_capped_in_bytes(rows: int, columns: int, frames: int, bits: int,
                                                             samples: int) -> None:
    """The decoded-bytes cap (rows x columns x frames x samples x bytes per sample <= 80 MB) is checked from the
    header before any pixel data is decoded, so multi-frame or 32/64-bit data cannot get around the pixel cap."""
    ds = _small_dx(Rows=rows, Columns=columns, BitsAllocated=bits, BitsStored=min(bits, 16),
                   HighBit=min(bits, 16) - 1, SamplesPerPixel=samples)
    if samples == 3:
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    if frames > 1:
        ds.NumberOfFrames = frames
    decoded = rows * columns * frames * samples * bits // 8
    with guarded() as outcome, pytest.raises(ImageDecodeError) as info:
        radiograph_from_dataset(read_dataset(_encode(ds)))
    assert outcome.peak < SMALL_INPUT_BUDGET
    if decoded > 80 * 1024 * 1024:
        assert "more than the 80 MB limit" in str(info.value)
        assert f"{columns}x{rows} pixels" in str(info.value)
        assert (f"{frames} frames of" in str(info.value)) == (frames > 1)
    else:
        assert "limit" not in str(info.value)


def test_deflated_dataset_bomb_is_refused_without_inflating_it(settings: Settings, db: Database) -> None:
    """Was F2 (SECURITY.md): pydicom inflates a Deflated Explicit VR Little Endian dataset in one
    ``zlib.decompress`` with no limit. ``dicom.limits.read_part10`` now inflates it first, within 96 MB, for
    both the ingest path (``read_header``) and the decode path (``read_dataset``)."""
    bomb = deflate_bomb(200)
    assert len(bomb) < 1_000_000  # 200 MB of zeros deflate to ~200 kB
    with guarded() as outcome, pytest.raises(InflatedTooLarge, match="deflated dataset inflates beyond 96 MB"):
        ingest(db, settings, bomb)
    assert outcome.peak < PEAK_LIMIT, f"inflated {outcome.peak / 1e6:.0f} MB from {len(bomb) / 1e3:.0f} kB"
    assert outcome.peak < 128 * 1024 * 1024, f"inflated {outcome.peak / 1e6:.0f} MB before refusing"
    with guarded() as outcome, pytest.raises(ImageDecodeError, match="deflated dataset inflates beyond 96 MB"):
        read_dataset(bomb)
    assert outcome.peak < 128 * 1024 * 1024, f"inflated {outcome.peak / 1e6:.0f} MB before refusing"
    _assert_store_is_consistent(settings, db)
    assert _count_instances(db) == 0


def test_deflate_bomb_answers_a_failure_status_and_a_4xx(settings: Settings, db: Database) -> None:
    """C-STORE: 0xA702 (Refused: Out of Resources, too large) with a comment that says why; HTTP: 413."""
    bomb = deflate_bomb(120)
    with pytest.raises(InflatedTooLarge) as info:
        ingest(db, settings, bomb, calling_ae="FUZZER")
    status = store_failure_status(info.value)
    assert status.Status == 0xA702 and "deflated" in status.ErrorComment
    with pytest.raises(InflatedTooLarge) as upload:
        ingest_upload(db, settings, bomb, content_type="application/dicom")
    assert upload.value.status == 413 and "inflates beyond 96 MB" in upload.value.message
    assert _count_instances(db) == 0


def test_a_deflated_dataset_within_the_limit_is_read_as_sent(settings: Settings, db: Database) -> None:
    """The bounded inflation changes nothing for a real deflated object: same pixels, the Transfer Syntax UID
    recorded and seen by the decoder is the one sent, the stored file is the bytes received."""
    data = DICOM_SEEDS["deflated"]
    ds = read_dataset(data)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(radiograph_from_dataset(ds).pixels, load_radiograph(DICOM_SEEDS["dx"]).pixels)
    result = ingest(db, settings, data)
    assert result.path.read_bytes() == data
    from service.models import Instance

    with db.session() as session:
        instance = session.get(Instance, result.instance_pk)
        assert instance is not None and instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    # the limit counts the inflated dataset (after the preamble and the file meta information): exactly at it
    # is read, one byte less is refused
    inflated, original = inflate_deflated(data)
    assert original == DeflatedExplicitVRLittleEndian
    start = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    assert inflated[:start] != data[:start] and len(inflated[:start]) == start
    size = len(inflated) - start
    assert size == len(zlib.decompress(data[start:], -zlib.MAX_WBITS))
    assert inflate_deflated(data, limit=size)[0] == inflated
    with pytest.raises(InputTooLarge, match="inflates beyond"):
        inflate_deflated(data, limit=size - 1)
    assert inflate_deflated(DICOM_SEEDS["dx"]) == (DICOM_SEEDS["dx"], None)


def test_compressed_pixel_data_that_lies_about_its_size_is_refused() -> None:
    """An RLE object of 32x24 pixels whose header claims 6000x6000 (36 MP of 16 bits: just under the caps)."""
    ds = _seed_datasets()["rle"]
    ds.Rows = ds.Columns = 6000
    with guarded() as outcome, pytest.raises(ImageDecodeError):
        radiograph_from_dataset(read_dataset(_encode(ds)))
    assert outcome.seconds < CASE_SECONDS and outcome.peak < PEAK_LIMIT


def test_nul_characters_in_text_elements_are_not_an_untyped_error(settings: Settings, db: Database) -> None:
    """BUG while failing (service/ingest.py ``_text``): on PostgreSQL a NUL in a text element (PatientName,
    PatientID, AccessionNumber...) makes psycopg2 raise ValueError, which ingest() lets through untyped: the
    C-STORE is answered 0xC001 and an HTTP upload gets a 500. Fix: drop NULs in ``_text``."""
    if db.is_sqlite:
        pytest.skip("SQLite stores NUL characters; the failure is PostgreSQL's")
    ds = _small_dx(PatientName="Doe\x00^John", PatientID="ID\x00", AccessionNumber="A\x001")
    with contextlib.suppress(IngestError):  # a typed refusal would do; storing with the NUL removed is better
        ingest(db, settings, _encode(ds))
    _assert_store_is_consistent(settings, db)


def test_a_random_sop_instance_uid_is_stored_only_under_its_content_hash(settings: Settings, db: Database) -> None:
    """Path traversal: UIDs never become paths; the file is named by its SHA-256 inside the store."""
    for uid in ("../../../../tmp/evil", "/etc/passwd", "..", "1.2.3/../../x", generate_uid()):
        ds = _small_dx()
        data = _encode(ds)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID"):
            data = _patch_text(data, keyword, uid)
        try:
            result = ingest(db, settings, data)
        except IngestError:
            continue
        resolved = result.path.resolve()
        assert resolved.is_relative_to(settings.storage_dir.resolve())
        assert resolved.name == f"{result.sha256}.dcm"
    _assert_store_is_consistent(settings, db)


def test_explicit_little_endian_is_the_seed_transfer_syntax() -> None:
    """The seeds decode before mutation (a seed that did not would make the fuzzing vacuous)."""
    for name, data in DICOM_SEEDS.items():
        assert load_radiograph(data).pixels.size > 0, name
    assert str(read_dataset(DICOM_SEEDS["dx"]).file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian
    for data in IMAGE_SEEDS.values():
        assert radiograph_from_image_bytes(data).pixels.size > 0


def test_truncated_deflated_object_is_a_typed_rejection(settings: Settings, db: Database) -> None:
    """BUG while failing (dicom/image.py ``read_dataset``, service/ingest.py ``read_header``): a truncated
    Deflated Explicit VR Little Endian object raises ``zlib.error``, which neither catches."""
    data = DICOM_SEEDS["deflated"][:362]
    with pytest.raises(ImageDecodeError):
        read_dataset(data)
    with pytest.raises(IngestError):
        ingest(db, settings, data)


@pytest.mark.parametrize("seed", ["dx", "deflated"])
def test_a_file_cut_inside_a_32_bit_length_is_a_typed_rejection(settings: Settings, db: Database, seed: str) -> None:
    """BUG while failing (service/ingest.py ``read_header``): a file cut inside the 4-byte length of an OB
    element of the file meta (here File Meta Information Version, bytes 152-155) makes pydicom raise
    ``struct.error``, which ``read_header`` did not catch. It also made
    test_truncated_deflated_object_is_a_typed_rejection fail in ~4% of runs: when the seed's random UIDs end the
    file meta at byte 354, the 8 deflated bytes left by its cut at 362 are read as an element header whose
    32-bit length is missing."""
    data = DICOM_SEEDS[seed][:154]
    with pytest.raises(IngestError):
        ingest(db, settings, data)
    with pytest.raises(ImageDecodeError):
        read_dataset(data)


def test_broken_element_length_in_the_file_meta_is_a_typed_rejection(settings: Settings, db: Database) -> None:
    """BUG while failing (service/ingest.py ``read_header``; dicom/image.py ``_check_size`` for the same
    error on Rows): pydicom raises ``BytesLengthException`` (not a ValueError) for an element whose length
    does not fit its VR, which the except tuples do not list."""
    data = DICOM_SEEDS["cr"][:141]  # cuts the (0002,0000) UL group length
    with pytest.raises(IngestError):
        ingest(db, settings, data)
    with pytest.raises(ImageDecodeError):
        load_radiograph(data)


def test_palette_colour_without_a_palette_is_a_typed_rejection() -> None:
    """BUG while failing (dicom/image.py ``radiograph_from_dataset``): a Secondary Capture that says PALETTE
    COLOR but has no palette makes ``apply_color_lut`` raise ValueError; the worker then retries it as a
    transient error and finally marks it failed instead of rejecting it with a reason."""
    ds = _small_dx(SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="OT", PhotometricInterpretation="PALETTE COLOR")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    with pytest.raises(ImageDecodeError):
        _worker_decode(_encode(ds))


def _first_fragment(data: bytes) -> int:
    """Offset of the first pixel data fragment's bytes in an encapsulated object."""
    pixel_data = data.find(b"\xe0\x7f\x10\x00")
    offset_table = data.find(b"\xfe\xff\x00\xe0", pixel_data)
    first = data.find(b"\xfe\xff\x00\xe0", offset_table + 4)
    return first + 8


def test_a_decoder_panic_is_a_typed_rejection() -> None:
    """BUG while failing (dicom/image.py ``_first_frame``): the RLE decoder (pylibjpeg-rle) is written in Rust;
    one wrong byte in a segment makes it panic, and pyo3's ``PanicException`` is a BaseException, which the
    ``except Exception`` there (and in the worker's ``process_batch``) lets through: the worker process dies,
    the job's lease expires, the next worker takes it and dies too, until its attempts are spent."""
    data = bytearray(DICOM_SEEDS["rle"])
    data[_first_fragment(bytes(data)) + 278] = 145
    with pytest.raises(ImageDecodeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _worker_decode(bytes(data))


@pytest.mark.parametrize(("keyword", "value"), [("WindowCenter", "nan"), ("RescaleSlope", "1e308"),
                                                ("ImagerPixelSpacing", "1"), ("NumberOfFrames", "x")])
def test_damaged_header_values_are_typed_rejections_or_finite(keyword: str, value: str) -> None:
    """BUG while failing (dicom/image.py ``radiograph_from_dataset``): pydicom converts elements lazily, so a
    damaged value fails wherever it is first read: a single ImagerPixelSpacing value raises TypeError in
    ``_pixel_spacing``, an unknown VR NotImplementedError in ``_check_size``; a NaN window or a huge rescale
    gives NaN pixels that go to the models. Fix: one ``except Exception`` around the decode that re-raises
    ImageDecodeError, and a finite-pixels check on the result."""
    data = _patch_text(DICOM_SEEDS["cr"], keyword, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            radiograph = _worker_decode(data)
        except ImageDecodeError:
            return
    assert radiograph is not None and np.isfinite(radiograph.pixels).all()


def test_unknown_vr_in_the_image_geometry_is_a_typed_rejection() -> None:
    data = bytearray(DICOM_SEEDS["cr"])
    rows = bytes(data).find(struct.pack("<HH", 0x0028, 0x0010) + b"US")
    data[rows + 4:rows + 6] = b"XX"
    with pytest.raises(ImageDecodeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _worker_decode(bytes(data))
