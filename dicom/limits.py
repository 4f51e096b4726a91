"""Size limits for hostile input, and the one bounded way to read a DICOM Part 10 object.

Shared by the DICOM decode path (:mod:`dicom.image`: the worker, the portal's rendering) and the ingest path
(:mod:`service.ingest`: the C-STORE listener and HTTP uploads). Only the standard library and pydicom are
imported here, so the web service and the listener do not pay for OpenCV.

The limits are tied to the largest plausible radiograph and to the node's 512 MB memory budget (SECURITY.md,
findings F2 and F5):

* :data:`MAX_IMAGE_PIXELS`, 40 MP per frame. The largest DX detectors are 43 x 43 cm at 0.1 mm, about
  4300 x 4300 = 18.5 MP; stitched long-length images at 0.15 mm are about 25 MP. 40 MP leaves twice the largest
  detector as headroom, while a decoded 40 MP frame in float32 (160 MB) still fits the budget.
* :data:`MAX_DECODED_BYTES`, 80 MB: rows x columns x frames x samples per pixel x bytes per sample, so that
  multi-frame, colour, 16-bit-RGBA or 32/64-bit data cannot get around the pixel cap (40 MP of 16-bit grey is
  exactly 80 MB).
* :data:`MAX_INFLATED_BYTES`, 96 MB: a Deflated Explicit VR Little Endian dataset (transfer syntax
  1.2.840.10008.1.2.1.99) may inflate to the largest decodable image plus 16 MB of header, overlays and private
  data. pydicom inflates such a dataset in one unbounded ``zlib.decompress`` call (200 kB of zeros become
  200 MB), so :func:`read_part10` inflates it first, never allocating more than the limit.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

from pydicom.dataset import FileDataset
from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, dcmread, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

MB = 1024 * 1024
#: Pixels in one frame (see the module docstring for why 40 MP).
MAX_IMAGE_PIXELS = 40_000_000
#: Bytes of decoded pixel data: rows x columns x frames x samples per pixel x bytes per sample.
MAX_DECODED_BYTES = 80 * MB
#: Bytes a deflated dataset may inflate to: the largest decodable image plus 16 MB for everything else.
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 16 * MB

_IN_PIECE = 64 * 1024
_OUT_PIECE = 1024 * 1024
_DEFLATED = str(DeflatedExplicitVRLittleEndian).encode("ascii")
_EXPLICIT = str(ExplicitVRLittleEndian).encode("ascii")


class InputTooLarge(ValueError):
    """The input would exceed one of the limits above once decoded or inflated; ``str()`` says which."""


class CorruptDeflate(ValueError):
    """A deflated dataset whose deflate stream is truncated or corrupt."""


def decoded_size_problem(width: int, height: int, *, frames: int = 1, samples: int = 1,
                         bytes_per_sample: int = 1) -> str | None:
    """Why an image of this geometry is too large to decode (a sentence), or None if it is within the limits."""
    pixels = width * height
    if pixels > MAX_IMAGE_PIXELS:
        return f"image of {width}x{height} pixels is larger than the {MAX_IMAGE_PIXELS:,} pixel limit"
    decoded = pixels * max(frames, 1) * max(samples, 1) * max(bytes_per_sample, 1)
    if decoded > MAX_DECODED_BYTES:
        count = f"{frames} frames of " if frames > 1 else ""
        return (f"{count}{width}x{height} pixels of {samples} sample(s) x {bytes_per_sample} byte(s) decode to "
                f"{decoded / MB:,.0f} MB, more than the {MAX_DECODED_BYTES // MB} MB limit")
    return None


def inflate_deflated(data: bytes, *, force: bool = True,
                     limit: int = MAX_INFLATED_BYTES) -> tuple[bytes, str | None]:
    """Inflate a Deflated Explicit VR Little Endian object before pydicom sees it, within ``limit`` bytes.

    Returns ``(data, None)`` for any other object (nothing is copied). For a deflated one, returns the same
    preamble, file meta information and command set followed by the inflated dataset, with the Transfer Syntax
    UID overwritten in place by Explicit VR Little Endian (padded with NULs to the same length, so no length
    changes) so that pydicom does not inflate it again, and the original Transfer Syntax UID.

    Raises :class:`InputTooLarge` ("deflated dataset inflates beyond N MB") as soon as more than ``limit`` bytes
    come out (no more than ``limit`` plus 1 MB is ever held), :class:`CorruptDeflate` for a truncated or corrupt
    stream, and whatever pydicom raises for a damaged preamble or file meta information (what ``dcmread``
    would raise for the same bytes). The object is recognised exactly as pydicom's ``read_partial`` does.
    """
    fp = io.BytesIO(data)
    read_preamble(fp, force)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return data, None
    _read_command_set_elements(fp)  # pydicom reads these before inflating: the dataset starts after them
    start = fp.tell()
    if start >= len(data):  # pydicom inflates nothing when nothing follows
        return data, None
    element = meta["TransferSyntaxUID"]
    at = getattr(element, "file_tell", None)
    if at is None or data[at:at + len(_DEFLATED)] != _DEFLATED:
        # Never hand pydicom a deflated object it would inflate itself.
        raise CorruptDeflate("the Transfer Syntax UID of the deflated dataset cannot be rewritten")
    out = io.BytesIO()
    out.write(data[:at])
    out.write(_EXPLICIT.ljust(len(_DEFLATED), b"\0"))
    out.write(data[at + len(_DEFLATED):start])
    _inflate_into(out, memoryview(data)[start:], limit)
    return out.getvalue(), str(meta.TransferSyntaxUID)


def _inflate_into(out: io.BytesIO, deflated: memoryview, limit: int) -> None:
    """Inflate a raw deflate stream into ``out``, refusing as soon as more than ``limit`` bytes come out.

    Input and output go in small pieces, so the peak is the output so far plus one piece (one
    ``decompress`` call with ``max_length`` would hold its output twice while joining it), and a BytesIO
    grows in place and hands its buffer over without a copy."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for offset in range(0, len(deflated), _IN_PIECE):
            piece: bytes | memoryview = deflated[offset:offset + _IN_PIECE]
            while piece and not inflater.eof:
                chunk = inflater.decompress(piece, _OUT_PIECE)
                total += len(chunk)
                if total > limit:
                    raise InputTooLarge(f"deflated dataset inflates beyond {limit // MB} MB")
                out.write(chunk)
                if not chunk and len(inflater.unconsumed_tail) == len(piece):
                    raise CorruptDeflate("the deflated dataset is corrupt (no progress)")
                piece = inflater.unconsumed_tail
            if inflater.eof:
                return  # like zlib.decompress (and so pydicom), anything after the end of the stream is ignored
    except zlib.error as exc:
        raise CorruptDeflate(f"the deflated dataset is corrupt ({exc})") from None
    raise CorruptDeflate("the deflated dataset is truncated")


def read_part10(data: bytes, *, force: bool = False, stop_before_pixels: bool = False,
                limit: int = MAX_INFLATED_BYTES) -> FileDataset:
    """``pydicom.dcmread`` of encoded bytes, with a deflated dataset inflated by :func:`inflate_deflated`.

    The dataset's Transfer Syntax UID is the one sent (Deflated Explicit VR Little Endian stays so). Raises what
    :func:`inflate_deflated` and ``dcmread`` raise; the callers turn that into their own typed errors.
    """
    inflated, original = inflate_deflated(data, force=force, limit=limit)
    ds = dcmread(io.BytesIO(inflated), force=force, stop_before_pixels=stop_before_pixels)
    if original is not None:
        ds.file_meta.TransferSyntaxUID = UID(original)
    return ds


def read_part10_file(path: str | Path, *, stop_before_pixels: bool = False,
                     limit: int = MAX_INFLATED_BYTES) -> FileDataset:
    """:func:`read_part10` of a file on disk (what the listener receives to): pydicom reads it from the file, so
    with ``stop_before_pixels`` the pixel data is never read. A deflated dataset is read into memory and
    inflated by :func:`read_part10` within ``limit`` (callers bound the file's size first). Raises what
    :func:`read_part10` raises, and ``OSError`` if the file cannot be read."""
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return read_part10(Path(path).read_bytes(), stop_before_pixels=stop_before_pixels, limit=limit)
    return dcmread(path, stop_before_pixels=stop_before_pixels)
