"""DICOMweb STOW-RS (PS3.18 §10.5): ``POST /dicomweb/studies`` with ``multipart/related;
type="application/dicom"`` feeds the same ingest path as C-STORE and uploads.

The response is the Store Instances Response Module as ``application/dicom+json``: Referenced SOP Sequence
(0008,1199) for stored instances, Failed SOP Sequence (0008,1198) with a Failure Reason (0008,1197) for the
rest. 200 when every instance was stored, 202 when some failed, 409 when none was stored.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Response, json, request, url_for
from sqlalchemy import select

from service.api import root_bp
from service.api.auth import principal, require_api_key
from service.errors import ServiceError, UnsupportedMediaType
from service.extensions import current_db, current_settings
from service.ingest import IngestError, ingest, read_header
from service.models import Study

#: PS3.18 Table I.2-1 failure reasons.
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def split_multipart_related(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/related`` body as (headers, bytes)."""
    match = _BOUNDARY_RE.search(content_type)
    if not match:
        raise ServiceError("multipart/related without a boundary parameter", code="bad_multipart")
    delimiter = b"--" + match.group(1).strip().encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise ServiceError("the multipart/related body has no parts", code="bad_multipart")
    parts = []
    for chunk in chunks[1:-1]:
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ServiceError("a multipart part has no header/body separator", code="bad_multipart")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload[:-2] if payload.endswith(b"\r\n") else payload))
    return parts


def _tag(value_type: str, *values: Any) -> dict[str, Any]:
    return {"vr": value_type, "Value": list(values)} if values else {"vr": value_type}


@root_bp.post("/dicomweb/studies")
@require_api_key
def stow_rs() -> Any:
    """Store DICOM Part 10 instances (STOW-RS)."""
    who = principal()
    content_type = request.headers.get("Content-Type", "")
    if request.mimetype != "multipart/related":
        raise UnsupportedMediaType('send multipart/related; type="application/dicom"')
    parts = split_multipart_related(request.get_data(cache=False), content_type)
    db, settings = current_db(), current_settings()
    referenced, failed, study_uids = [], [], []
    for headers, data in parts:
        part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        sop_class = sop_instance = None
        try:
            if part_type != "application/dicom":
                raise UnsupportedMediaType(f"part content type {part_type!r} is not application/dicom")
            header = read_header(data)
            sop_class, sop_instance = header.sop_class_uid, header.sop_instance_uid
            result = ingest(db, settings, data, source="api", peer_address=request.remote_addr,
                            uploaded_by_id=who.user.id)
        except IngestError as exc:
            reason = OUT_OF_RESOURCES if exc.status == 503 else CANNOT_UNDERSTAND
            failed.append({"00081150": _tag("UI", *([sop_class] if sop_class else [])),
                           "00081155": _tag("UI", *([sop_instance] if sop_instance else [])),
                           "00081197": _tag("US", reason)})
            continue
        except ServiceError:
            failed.append({"00081150": _tag("UI"), "00081155": _tag("UI"), "00081197": _tag("US", CANNOT_UNDERSTAND)})
            continue
        study_uids.append(result.study_instance_uid)
        with db.session() as session:
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == result.study_instance_uid))
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
