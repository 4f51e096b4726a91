"""The OpenAPI 3.1 document of the REST API, served at ``/api/v1/openapi.json``, and its reference page at
``/api/v1/docs`` (server-rendered HTML built from the same document: no scripts, no CDN).

The document is written here by hand, next to the code; ``tests/test_openapi.py`` checks that every route
of the application under ``/api/v1``, ``/dicomweb``, ``/healthz``, ``/readyz`` and ``/metrics`` is in it
with the same methods (and nothing else is), and runs schemathesis against it.
"""

from __future__ import annotations

import copy
import html
import json
from typing import Any

from flask import Response, jsonify

from pipeline.taxonomy import FRACTURE_TYPES
from service import __version__
from service.api import bp

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or list(properties), **extra}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


ERRORS = {
    "400": _error("Malformed request (bad parameter, cursor, JSON or Idempotency-Key)."),
    "401": {**_error("Missing, invalid or revoked API key, or its user is disabled."),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
    "404": _error("No such object, or not visible to this key (never 403: ids cannot be probed)."),
    "409": _error("Conflict (Idempotency-Key reused with another request or still running; no result yet)."),
    "413": _error("Request larger than FRACTURE_MAX_UPLOAD_MB."),
    "415": _error("Unsupported content type, or content that is not DICOM, PNG or JPEG."),
    "422": _error("Well-formed request that fails validation (e.g. an image that cannot be decoded)."),
    "429": {**_error("Too many requests for this API key (token bucket); see Retry-After."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    "503": {**_error("Database or storage unavailable, or the disk full (storage_full); retry after Retry-After "
                     "seconds."),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: ERRORS[code] for code in ("400", "401", "429", "503", *codes)}


STUDY_ID = {"name": "study_id", "in": "path", "required": True,
            "description": "Study id (from a submission or a list).", "schema": {"type": "integer", "minimum": 1}}
INSTANCE_ID = {"name": "instance_id", "in": "path", "required": True,
               "description": "Instance id (from the study).", "schema": {"type": "integer", "minimum": 1}}
TS = _nullable("string", format="date-time")
STR = _nullable("string")
NUM = _nullable("number")

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _obj({
        "code": {"type": "string", "description": "Machine-readable code, e.g. not_found, rate_limited."},
        "message": {"type": "string", "description": "What went wrong, for people."},
        "details": {"description": "Optional structured details (field problems, parameter name...)."},
    }, ["code", "message", "details"])}),
    "SubmissionItem": _obj({
        "filename": STR, "study_id": {"type": "integer"}, "study_instance_uid": {"type": "string"},
        "instance_id": {"type": "integer"}, "sop_instance_uid": {"type": "string"},
        "job_id": _nullable("integer"),
        "duplicate": {"type": "boolean", "description": "The same DICOM instance was already stored: no new job."},
        "status_url": {"type": "string"},
    }),
    "Submission": _obj({
        "study_ids": {"type": "array", "items": {"type": "integer"}},
        "job_ids": {"type": "array", "items": {"type": "integer"}},
        "items": {"type": "array", "items": _ref("SubmissionItem")},
        "location": {"type": "string", "description": "URL of the (first) study; also the Location header."},
    }),
    "Patient": _obj({"patient_id": STR, "issuer": STR, "name": STR, "birth_date": STR, "sex": STR}),
    "StudySummary": _obj({
        "id": {"type": "integer"}, "study_instance_uid": {"type": "string"}, "accession_number": STR,
        "study_date": STR, "study_time": STR, "description": STR, "referring_physician_name": STR,
        "patient": _ref("Patient"), "source": {"type": "string", "enum": ["dicom", "upload", "api"]},
        "calling_ae": STR,
        "status": {"type": "string", "enum": ["received", "processing", "failed", "done", "rejected"],
                   "description": "processing while any job is unfinished, else failed, done, rejected."},
        "result": {"type": ["string", "null"], "enum": ["fracture", "indeterminate", "no_fracture", None],
                   "description": "The most severe call over the study's images; null until there is one."},
        "max_fracture_probability": NUM, "instance_count": {"type": "integer"},
        "report_state": {"type": "string"}, "created_at": TS, "last_instance_at": TS, "reported_at": TS,
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
    }),
    "StudyPage": _obj({
        "items": {"type": "array", "items": _ref("StudySummary")},
        "next_cursor": _nullable("string", description="Pass as cursor for the next page; null on the last."),
        "limit": {"type": "integer"},
    }),
    "JobEvent": _obj({"state": {"type": "string"}, "at": TS, "detail": STR}),
    "Job": _obj({
        "id": {"type": "integer"}, "instance_id": {"type": "integer"},
        "state": {"type": "string", "enum": ["received", "queued", "processing", "done", "rejected", "failed"]},
        "attempts": {"type": "integer"}, "max_attempts": {"type": "integer"}, "reason": STR, "error": STR,
        "created_at": TS, "started_at": TS, "finished_at": TS,
        "timeline": {"type": "array", "items": _ref("JobEvent")},
        "study_id": {"type": "integer"}, "links": {"type": "object", "additionalProperties": {"type": "string"}},
    }, ["id", "instance_id", "state", "attempts", "max_attempts", "reason", "error", "created_at", "started_at",
        "finished_at", "timeline"]),
    "ModelRef": _obj({"name": STR, "version": STR}),
    "ModelIdentity": _obj({"name": {"type": "string"}, "version": {"type": "string"}, "sha256": STR,
                           "task": STR}),
    "Result": _obj({
        "id": {"type": "integer"}, "job_id": _nullable("integer"),
        "validity": _obj({"is_radiograph": {"type": "boolean"}, "score": {"type": "number"},
                          "reason": {"type": "string"}}),
        "fracture_probability": NUM, "operating_point": NUM,
        "call": {"type": ["string", "null"], "enum": ["fracture", "no_fracture", "indeterminate", None]},
        "top_type": {"type": ["string", "null"], "enum": [*FRACTURE_TYPES, None]},
        "top_type_probability": NUM,
        "type_distribution": {"type": ["object", "null"], "additionalProperties": {"type": "number"},
                              "description": "Probability of each of the eleven fracture types."},
        "peak_box": {"type": ["array", "null"], "items": {"type": "number"},
                     "description": "Heatmap peak box [x0, y0, x1, y1] in image pixels."},
        "pixel_spacing_mm": {"type": ["array", "null"], "items": {"type": "number"}},
        "model": _ref("ModelRef"),
        "models": {"type": "array", "items": _ref("ModelIdentity")},
        "explanations": _obj({"heatmap": {"type": "boolean"}, "edges": {"type": "boolean"},
                              "hybrid": {"type": "boolean"}}),
        "created_at": TS,
        "disclaimer": {"type": "string"},
    }),
    "Instance": _obj({
        "id": {"type": "integer"}, "sop_instance_uid": {"type": "string"}, "sop_class_uid": {"type": "string"},
        "version": {"type": "integer"}, "changed_from_previous": {"type": "boolean"},
        "instance_number": _nullable("integer"), "series_instance_uid": {"type": "string"}, "modality": STR,
        "body_part": STR, "laterality": STR, "size_bytes": {"type": "integer"}, "sha256": {"type": "string"},
        "source": {"type": "string"}, "original_filename": STR, "received_at": TS, "status": {"type": "string"},
        "job": {"oneOf": [_ref("Job"), {"type": "null"}]},
        "jobs": {"type": "array", "items": _ref("Job")},
        "result": {"oneOf": [_ref("Result"), {"type": "null"}]},
        "available": _obj({k: {"type": "boolean"} for k in ("original", "heatmap", "edges", "hybrid", "sc")}),
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
    }),
    "Delivery": _obj({"id": {"type": "integer"}, "destination": {"type": "string"}, "state": {"type": "string"},
                      "attempts": {"type": "integer"}, "last_status": _nullable("integer"), "last_error": STR,
                      "next_attempt_at": TS, "delivered_at": TS}),
    "Artifact": _obj({"id": {"type": "integer"}, "kind": {"type": "string"}, "instance_id": _nullable("integer"),
                      "sop_class_uid": STR, "sop_instance_uid": STR, "series_instance_uid": STR,
                      "available": {"type": "boolean"}, "created_at": TS,
                      "deliveries": {"type": "array", "items": _ref("Delivery")}}),
    "FeedbackRequest": {
        "type": "object", "required": ["agrees"], "additionalProperties": False,
        "properties": {"agrees": {"type": "boolean", "description": "Does the clinician agree with the result?"},
                       "fracture_present": {"type": ["boolean", "null"]},
                       "correct_type": {"type": ["string", "null"], "enum": [*FRACTURE_TYPES, None]},
                       "comment": {"type": ["string", "null"], "maxLength": 2000}},
    },
    "Feedback": _obj({"id": {"type": "integer"}, "result_id": {"type": "integer"},
                      "instance_id": {"type": "integer"}, "study_id": {"type": "integer"},
                      "agrees": {"type": "boolean"}, "fracture_present": {"type": ["boolean", "null"]},
                      "correct_type": STR, "comment": STR, "created_at": TS}),
    "ModelCard": _obj({
        "bundle": {"type": "string"}, "name": STR, "version": STR, "task": STR,
        "classes": {"type": "array", "items": {"type": "string"}}, "architecture": STR, "weights_sha256": STR,
        "operating_point": NUM, "indeterminate_band": {"type": ["array", "null"], "items": {"type": "number"}},
        "temperature": NUM, "detection_fusion": {"type": ["object", "null"]},
        "metrics": {"type": "object"}, "training": {"type": "object"}, "intended_use": STR,
        "created": STR, "status": {"type": "string", "enum": ["ok", "invalid"]}, "problem": STR,
        "disclaimer": {"type": "string"},
    }, ["bundle", "name", "version", "task", "status", "problem", "disclaimer"]),
    "ModelList": _obj({"model_dir": {"type": "string"}, "mirror_look": {"type": "boolean"},
                       "models": {"type": "array", "items": _ref("ModelCard")}}),
    "Health": _obj({"status": {"type": "string"}, "version": {"type": "string"}}),
    "Readiness": _obj({"status": {"type": "string", "enum": ["ready", "not_ready"]},
                       "checks": {"type": "object", "additionalProperties": {"type": "string"}}}),
    "StowResponse": {"type": "object", "description": "PS3.18 Store Instances Response Module (DICOM JSON)."},
}
_summary_props = SCHEMAS["StudySummary"]["properties"]
SCHEMAS["StudyDetail"] = _obj({
    **_summary_props,
    "instances": {"type": "array", "items": _ref("Instance")},
    "artifacts": {"type": "array", "items": _ref("Artifact")},
    "available": _obj({"sr": {"type": "boolean"}}),
    "disclaimer": {"type": "string"},
})


def _json_ok(schema: str, description: str, code: str = "200", headers: dict[str, Any] | None = None) -> dict:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": _ref(schema)}}}
    if headers:
        response["headers"] = headers
    return {code: response}


def _download(summary: str, mimetype: str, *params: dict[str, Any], tag: str = "downloads") -> dict[str, Any]:
    return {"get": {
        "operationId": summary.split(":")[0], "summary": summary.split(":", 1)[1].strip(), "tags": [tag],
        "parameters": list(params),
        "responses": {"200": {"description": "The file.", "content": {mimetype: {"schema": {
            "type": "string", "format": "binary"}}}}, **_errors("404")},
    }}


PUBLIC: list[dict[str, list[str]]] = []

PATHS: dict[str, Any] = {
    "/api/v1/studies": {
        "post": {
            "operationId": "submitImages", "tags": ["studies"],
            "summary": "Submit one or more images (DICOM, PNG, JPEG) for analysis",
            "description": "multipart/form-data with one or more parts named `file`. PNG and JPEG are wrapped as "
                           "DICOM Secondary Capture objects (one study each); DICOM keeps its own study. Sending "
                           "a DICOM instance again is idempotent. With an `Idempotency-Key` header a retried "
                           "request returns the first response (`Idempotent-Replayed: true`) and creates nothing.",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "maxLength": 128}}],
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                             "description": "The images (application/dicom, image/png, image/jpeg)."},
                    "patient_id": {"type": "string", "maxLength": 64, "description": "For PNG/JPEG only."},
                    "patient_name": {"type": "string", "maxLength": 324, "description": "DICOM PN, Family^Given."},
                    "referring_physician_name": {"type": "string", "maxLength": 324},
                }},
            }}},
            "responses": {**_json_ok("Submission", "Accepted: stored and queued.", "202",
                                     {"Location": {"schema": {"type": "string"}}}),
                          **_errors("409", "413", "415", "422")},
        },
        "get": {
            "operationId": "listStudies", "tags": ["studies"],
            "summary": "List visible studies, newest first, with filters and cursor pagination",
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                                             "default": 20}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "next_cursor of the previous page."},
                {"name": "status", "in": "query",
                 "schema": {"type": "string", "enum": ["received", "processing", "failed", "done", "rejected"]}},
                {"name": "result", "in": "query",
                 "schema": {"type": "string", "enum": ["fracture", "no_fracture", "indeterminate"]}},
                {"name": "patient_id", "in": "query", "schema": {"type": "string"}},
                {"name": "accession", "in": "query", "schema": {"type": "string"}},
                {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"},
                 "description": "Received at or after (ISO 8601; UTC when no offset)."},
                {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"},
                 "description": "Received before (ISO 8601)."},
            ],
            "responses": {**_json_ok("StudyPage", "A page of studies."), **_errors()},
        },
    },
    "/api/v1/studies/{study_id}": {"get": {
        "operationId": "getStudy", "tags": ["studies"],
        "summary": "Study status and results: jobs and timelines, results, artifacts, deliveries",
        "parameters": [STUDY_ID],
        "responses": {**_json_ok("StudyDetail", "The study."), **_errors("404")},
    }},
    "/api/v1/jobs/{job_id}": {"get": {
        "operationId": "getJob", "tags": ["studies"], "summary": "One job's state and timeline",
        "parameters": [{"name": "job_id", "in": "path", "required": True,
                        "schema": {"type": "integer", "minimum": 1}}],
        "responses": {**_json_ok("Job", "The job."), **_errors("404")},
    }},
    "/api/v1/studies/{study_id}/instances/{instance_id}/original": _download(
        "downloadOriginal: The stored DICOM object (an upload's Secondary Capture wrapper)", "application/dicom",
        STUDY_ID, INSTANCE_ID),
    "/api/v1/studies/{study_id}/instances/{instance_id}/heatmap.png": _download(
        "downloadHeatmap: Grad-CAM heatmap (PNG)", "image/png", STUDY_ID, INSTANCE_ID),
    "/api/v1/studies/{study_id}/instances/{instance_id}/hybrid.png": _download(
        "downloadHybrid: Hybrid overlay of heatmap and edges on the image (PNG)", "image/png", STUDY_ID,
        INSTANCE_ID),
    "/api/v1/studies/{study_id}/instances/{instance_id}/edges.png": _download(
        "downloadEdges: Canny edge map (PNG)", "image/png", STUDY_ID, INSTANCE_ID),
    "/api/v1/studies/{study_id}/instances/{instance_id}/sc.dcm": _download(
        "downloadSecondaryCapture: DICOM Secondary Capture of the heatmap overlay", "application/dicom", STUDY_ID,
        INSTANCE_ID),
    "/api/v1/studies/{study_id}/sr.dcm": _download(
        "downloadStructuredReport: DICOM Structured Report of the study", "application/dicom", STUDY_ID),
    "/api/v1/studies/{study_id}/instances/{instance_id}/feedback": {"post": {
        "operationId": "submitFeedback", "tags": ["feedback"],
        "summary": "A clinician's agreement or correction on the instance's latest result",
        "parameters": [STUDY_ID, INSTANCE_ID],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("FeedbackRequest")}}},
        "responses": {**_json_ok("Feedback", "Recorded.", "201"), **_errors("404", "409", "415", "422")},
    }},
    "/api/v1/models": {"get": {
        "operationId": "listModels", "tags": ["models"],
        "summary": "The model bundles this node runs (from their model cards)",
        "responses": {**_json_ok("ModelList", "The model cards."), **_errors()},
    }},
    "/api/v1/openapi.json": {"get": {
        "operationId": "getOpenApi", "tags": ["meta"], "summary": "This document", "security": PUBLIC,
        "responses": {"200": {"description": "OpenAPI 3.1 document.", "content": {JSON: {"schema": {
            "type": "object"}}}}},
    }},
    "/api/v1/docs": {"get": {
        "operationId": "getDocs", "tags": ["meta"], "summary": "This document as an HTML reference page",
        "security": PUBLIC,
        "responses": {"200": {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}}},
    }},
    "/dicomweb/studies": {"post": {
        "operationId": "stowRs", "tags": ["dicomweb"], "summary": "DICOMweb STOW-RS: store DICOM instances",
        "description": "PS3.18 §10.5. Body: multipart/related; type=\"application/dicom\". 200 when every "
                       "instance was stored, 202 when some failed, 409 when none was (DICOM JSON body).",
        "requestBody": {"required": True, "content": {"multipart/related": {"schema": {
            "type": "string", "format": "binary"}}}},
        "responses": {
            "200": {"description": "All stored.", "content": {"application/dicom+json": {"schema": _ref(
                "StowResponse")}}},
            "202": {"description": "Some stored.", "content": {"application/dicom+json": {"schema": _ref(
                "StowResponse")}}},
            "409": {"description": "None stored.", "content": {"application/dicom+json": {"schema": _ref(
                "StowResponse")}, JSON: {"schema": _ref("Error")}}},
            **{k: v for k, v in _errors("413", "415", "422").items()},
        },
    }},
    "/healthz": {"get": {
        "operationId": "healthz", "tags": ["health"], "summary": "Liveness", "security": PUBLIC,
        "responses": _json_ok("Health", "The process is alive."),
    }},
    "/readyz": {"get": {
        "operationId": "readyz", "tags": ["health"], "summary": "Readiness: database, storage and model bundles",
        "security": PUBLIC,
        "responses": {**_json_ok("Readiness", "Ready."),
                      "503": {"description": "Not ready; checks say why.",
                              "content": {JSON: {"schema": _ref("Readiness")}},
                              "headers": {"Retry-After": {"schema": {"type": "integer"}}}}},
    }},
    "/metrics": {"get": {
        "operationId": "metrics", "tags": ["health"], "summary": "Prometheus metrics (text exposition format)",
        "security": PUBLIC,
        "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {
            "type": "string"}}}}},
    }},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "FractureNode API",
        "version": __version__,
        "summary": "Bone radiograph fracture detection: submit images, read results, download DICOM outputs.",
        "description": "Research use only. Not for diagnostic use. Every request except health, metrics and "
                       "this document needs `Authorization: Bearer <API key>` (keys are created by an admin: "
                       "`fracture-node apikeys create --user NAME --name WHAT`). Errors always have the shape "
                       "`{\"error\": {\"code\", \"message\", \"details\"}}`. Rate limit: a token bucket per key "
                       "(in each web process); an empty bucket answers 429 with Retry-After.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearerAuth": []}],
    "tags": [{"name": n} for n in ("studies", "downloads", "feedback", "models", "dicomweb", "health", "meta")],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "An API key: fn_<prefix>_<secret>."}},
    },
}


def document() -> dict[str, Any]:
    return copy.deepcopy(DOCUMENT)


@bp.get("/openapi.json")
def openapi_json() -> Any:
    return jsonify(document())


# ------------------------------------------------------------------------------------------- HTML page


def _schema_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f'<a href="#schema-{name}">{html.escape(name)}</a>'
    if "oneOf" in schema:
        return " | ".join(_schema_text(s) for s in schema["oneOf"])
    kind = schema.get("type", "any")
    kinds = kind if isinstance(kind, list) else [kind]
    text = " | ".join(html.escape(str(k)) for k in kinds)
    if "array" in kinds and "items" in schema:
        text += " of " + _schema_text(schema["items"])
    if "enum" in schema:
        text += " (" + ", ".join(html.escape(json.dumps(v)) for v in schema["enum"]) + ")"
    if "format" in schema:
        text += f" ({html.escape(schema['format'])})"
    return text


def render_html(doc: dict[str, Any]) -> str:
    e = html.escape
    out = ["<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{e(doc['info']['title'])} reference</title></head><body>",
           f"<h1>{e(doc['info']['title'])} {e(doc['info']['version'])}</h1>",
           f"<p>{e(doc['info']['summary'])}</p><p>{e(doc['info']['description'])}</p>",
           '<p>Machine-readable: <a href="/api/v1/openapi.json">openapi.json</a> (OpenAPI 3.1).</p>',
           "<h2>Operations</h2><ul>"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            out.append(f'<li><a href="#op-{e(op["operationId"])}"><code>{method.upper()} {e(path)}</code></a> '
                       f"{e(op['summary'])}</li>")
    out.append("</ul>")
    for path, item in doc["paths"].items():
        for method, op in item.items():
            out.append(f'<section id="op-{e(op["operationId"])}"><h3><code>{method.upper()} {e(path)}</code></h3>')
            out.append(f"<p>{e(op['summary'])}</p>")
            if op.get("description"):
                out.append(f"<p>{e(op['description'])}</p>")
            out.append(f"<p>Authentication: {'none' if op.get('security') == [] else 'Bearer API key'}</p>")
            if op.get("parameters"):
                out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th>"
                           "<th>description</th></tr>")
                for p in op["parameters"]:
                    out.append(f"<tr><td><code>{e(p['name'])}</code></td><td>{e(p['in'])}</td>"
                               f"<td>{_schema_text(p['schema'])}</td><td>{'yes' if p.get('required') else 'no'}"
                               f"</td><td>{e(p.get('description', ''))}</td></tr>")
                out.append("</table>")
            if "requestBody" in op:
                for ctype, media in op["requestBody"]["content"].items():
                    out.append(f"<p>Request body <code>{e(ctype)}</code>: {_schema_text(media['schema'])}")
                    props = media["schema"].get("properties")
                    if props:
                        out.append("<ul>" + "".join(f"<li><code>{e(k)}</code>: {_schema_text(v)}</li>"
                                                    for k, v in props.items()) + "</ul>")
                    out.append("</p>")
            out.append("<table><tr><th>status</th><th>content</th><th>description</th></tr>")
            for code, response in op["responses"].items():
                content = "; ".join(f"<code>{e(c)}</code> {_schema_text(m['schema'])}"
                                    for c, m in response.get("content", {}).items())
                out.append(f"<tr><td>{e(code)}</td><td>{content}</td><td>{e(response['description'])}</td></tr>")
            out.append("</table></section>")
    out.append("<h2>Schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f'<section id="schema-{e(name)}"><h3>{e(name)}</h3>')
        if schema.get("description"):
            out.append(f"<p>{e(schema['description'])}</p>")
        props = schema.get("properties", {})
        if props:
            required = set(schema.get("required", []))
            out.append("<table><tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>")
            for key, sub in props.items():
                out.append(f"<tr><td><code>{e(key)}</code></td><td>{_schema_text(sub)}</td>"
                           f"<td>{'yes' if key in required else 'no'}</td><td>{e(sub.get('description', ''))}"
                           "</td></tr>")
            out.append("</table>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


@bp.get("/docs")
def docs_page() -> Response:
    return Response(render_html(document()), mimetype="text/html")
