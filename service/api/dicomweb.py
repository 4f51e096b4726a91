"""DICOMweb STOW-RS (PS3.18 §10.5): ``POST /dicomweb/studies`` with ``multipart/related;
type="application/dicom"`` feeds the same ingest path as C-STORE and uploads.

The body is never held in memory: :func:`read_multipart_related` reads it in 1 MiB pieces and each DICOM part
is written as it arrives to a file of the incoming folder (``service.ingest.spool_writer``: hashed, size-limited
and sniffed as it is written), then stored from there through ``ingest_file``, as the listener and the other
uploads are. Every part is on disk before the first is stored, so a malformed body stores nothing; the files
are removed whatever the outcome.

The response is the Store Instances Response Module as ``application/dicom+json``: Referenced SOP Sequence
(0008,1199) for stored instances, Failed SOP Sequence (0008,1198) with a Failure Reason (0008,1197) for the
rest. 200 when every instance was stored, 202 when some failed, 409 when none was stored.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from flask import Response, json, request, url_for
from sqlalchemy import select

from config import Settings
from service.api import root_bp
from service.api.auth import principal, require_api_key
from service.errors import ServiceError, Unprocessable, UnsupportedMediaType
from service.extensions import current_db, current_settings
from service.ingest import (
    CHUNK,
    IngestError,
    InstanceTooLarge,
    SpooledUpload,
    UploadWriter,
    ingest_file,
    read_header,
    spool_writer,
)
from service.models import Study

#: PS3.18 Table I.2-1 failure reasons.
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
#: The most a part's header block may take (a STOW-RS part has a line or two of headers).
MAX_PART_HEADERS = 16 * 1024
#: The most parts one STOW-RS request may carry: far above a radiographic study's instances, and a bound on the
#: files a body of tiny parts would make in the incoming folder before any is stored.
MAX_PARTS = 1000


def _bad(message: str) -> ServiceError:
    return ServiceError(message, code="bad_multipart")


def boundary_of(content_type: str) -> str:
    """The ``boundary`` parameter of a ``multipart/related`` Content-Type (quoted or not)."""
    match = _BOUNDARY_RE.search(content_type)
    if not match or not match.group(1).strip():
        raise _bad("multipart/related without a boundary parameter")
    return match.group(1).strip()


def _safe_end(buf: bytes, delimiter: bytes) -> int:
    """How much of ``buf``, which holds no whole ``delimiter``, is surely part data: all but a tail that may be
    the start of a delimiter cut off by the end of the piece (a CR, CR LF, CR LF -... up to all but its last
    byte). Most pieces have none, and are passed on whole."""
    at = buf.find(b"\r", max(0, len(buf) - len(delimiter) + 1))
    while at >= 0 and not delimiter.startswith(buf[at:]):
        at = buf.find(b"\r", at + 1)
    return len(buf) if at < 0 else at


def read_multipart_related(stream: IO[bytes], boundary: str, *,
                           chunk: int = CHUNK) -> Iterator[dict[str, str] | bytes]:
    """The parts of a ``multipart/related`` body (RFC 2046 §5.1.1, RFC 2387) as ``stream`` is read in pieces of
    at most ``chunk`` bytes: for each part a dict of its headers (names in lower case), then its body in one or
    more pieces (none when it is empty). Nothing is held beyond a piece and the bytes around a delimiter that
    straddles two pieces (a delimiter is CRLF ``--boundary``, the first one may open the body without the CRLF;
    the bytes before it, the preamble, and after the close delimiter ``--boundary--``, the epilogue, are read
    and ignored). Raises ``bad_multipart`` (400) for a body without a part, a part whose headers do not end
    (within :data:`MAX_PART_HEADERS`), a delimiter line with more than transport padding after the boundary, or
    a body that ends before its close delimiter."""
    dash = b"--" + boundary.encode("latin-1")
    delimiter = b"\r\n" + dash
    keep = len(delimiter) - 1  # the most of a delimiter that can end a piece
    buf = b""
    ended = False

    def more() -> bool:
        nonlocal buf, ended
        piece = b"" if ended else stream.read(chunk)
        ended = not piece
        buf += piece
        return not ended

    while len(buf) < len(dash) and more():
        pass
    if buf.startswith(dash):
        buf = buf[len(dash):]
    else:
        while (at := buf.find(delimiter)) < 0:
            buf = buf[-keep:]
            if not more():
                raise _bad("the multipart/related body has no parts")
        buf = buf[at + len(delimiter):]
    parts = 0
    while True:  # just after a delimiter
        while len(buf) < 2 and more():
            pass
        if buf.startswith(b"--"):  # the close delimiter
            if not parts:
                raise _bad("the multipart/related body has no parts")
            while stream.read(chunk):
                pass
            return
        while (end := buf.find(b"\r\n\r\n", 0, MAX_PART_HEADERS)) < 0:
            if len(buf) >= MAX_PART_HEADERS:
                raise _bad(f"a multipart part's headers are longer than {MAX_PART_HEADERS} bytes")
            if not more():
                raise _bad("the multipart/related body ends before its close delimiter" if not buf.strip()
                           else "a multipart part has no header/body separator")
        line_end = buf.find(b"\r\n")  # the delimiter's line: transport padding (spaces, tabs) may precede it
        if buf[:line_end].strip(b" \t"):
            raise _bad("a multipart delimiter is followed by more than its boundary on its line")
        headers = {}
        for line in buf[line_end + 2:end].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        yield headers
        parts += 1
        buf = buf[end + 4:]
        while (at := buf.find(delimiter)) < 0:
            safe = _safe_end(buf, delimiter)
            if safe:  # most often all of it: no copy of the piece
                yield buf if safe == len(buf) else buf[:safe]
                buf = buf[safe:]
            if not more():
                raise _bad("the multipart/related body ends before its close delimiter")
        if at:
            yield buf[:at]
        buf = buf[at + len(delimiter):]


def _tag(value_type: str, *values: Any) -> dict[str, Any]:
    return {"vr": value_type, "Value": list(values)} if values else {"vr": value_type}


@dataclass
class _Part:
    """A part of a STOW-RS body as it was received."""

    content_type: str
    #: Where its body is being written (an ``application/dicom`` part), until it ends.
    writer: UploadWriter | None = None
    #: Its body in the incoming folder, once it ended (of a part over the size limit, its first bytes).
    spooled: SpooledUpload | None = None
    too_large: InstanceTooLarge | None = None


def _spool_parts(stream: IO[bytes], boundary: str, settings: Settings,
                 files: contextlib.ExitStack) -> list[_Part]:
    """Every part of the body, each ``application/dicom`` one written to a file of the incoming folder as it is
    read (removed when ``files`` closes). A part over the size limit is written up to the limit and the rest of
    it skipped (it fails alone, as it did when the body was read whole); other parts are not written."""
    parts: list[_Part] = []
    part: _Part | None = None

    def end(part: _Part | None) -> None:
        if part is not None and part.writer is not None:
            part.spooled, part.writer = part.writer.finish(), None

    for event in read_multipart_related(stream, boundary):
        if isinstance(event, dict):
            end(part)
            if len(parts) >= MAX_PARTS:
                raise Unprocessable(f"at most {MAX_PARTS} parts per STOW-RS request; send the rest in another",
                                    code="too_many_parts")
            part = _Part(event.get("content-type", "application/dicom").split(";")[0].strip().lower())
            if part.content_type == "application/dicom":
                part.writer = files.enter_context(spool_writer(settings))
            parts.append(part)
        elif part is not None and part.writer is not None and part.too_large is None:
            try:
                part.writer.write(event)
            except InstanceTooLarge as exc:
                part.too_large = exc
    end(part)
    return parts


@root_bp.post("/dicomweb/studies")
@require_api_key
def stow_rs() -> Any:
    """Store DICOM Part 10 instances (STOW-RS)."""
    who = principal()
    content_type = request.headers.get("Content-Type", "")
    if request.mimetype != "multipart/related":
        raise UnsupportedMediaType('send multipart/related; type="application/dicom"')
    stream = request.stream  # 413 here for a body over MAX_CONTENT_LENGTH (the upload limit)
    boundary = boundary_of(content_type)
    db, settings = current_db(), current_settings()
    referenced, failed = [], []
    with contextlib.ExitStack() as files:  # every part's file in the incoming folder is removed on leaving
        # A disk that fills while the parts are written is 503 storage_full for the request, as for the other
        # uploads; one that fills while a part is stored fails that part (Out of Resources), as before.
        for part in _spool_parts(stream, boundary, settings, files):
            sop_class = sop_instance = None
            try:
                if part.content_type != "application/dicom":
                    raise UnsupportedMediaType(f"part content type {part.content_type!r} is not application/dicom")
                assert part.spooled is not None
                # Of a part over the limit, the header read from its first bytes names it in the failure.
                header = read_header(part.spooled.path)
                sop_class, sop_instance = header.sop_class_uid, header.sop_instance_uid
                if part.too_large is not None:
                    raise part.too_large
                result = ingest_file(db, settings, part.spooled.path, source="api", peer_address=request.remote_addr,
                                     uploaded_by_id=who.user.id, sha256=part.spooled.sha256, link=True)
            except IngestError as exc:
                reason = OUT_OF_RESOURCES if exc.status == 503 else CANNOT_UNDERSTAND
                failed.append({"00081150": _tag("UI", *([sop_class] if sop_class else [])),
                               "00081155": _tag("UI", *([sop_instance] if sop_instance else [])),
                               "00081197": _tag("US", reason)})
                continue
            except ServiceError:
                failed.append({"00081150": _tag("UI"), "00081155": _tag("UI"),
                               "00081197": _tag("US", CANNOT_UNDERSTAND)})
                continue
            with db.session() as session:
                study_id = session.scalar(select(Study.id)
                                          .where(Study.study_instance_uid == result.study_instance_uid))
            referenced.append({"00081150": _tag("UI", result.sop_class_uid),
                               "00081155": _tag("UI", result.sop_instance_uid),
                               "00081190": _tag("UR", url_for("api.get_study", study_id=study_id, _external=True))})
    body: dict[str, Any] = {}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if referenced else 409)
    return Response(json.dumps(body), status=status, mimetype="application/dicom+json")
