"""The printable study report (HTML and PDF) and downloads of the study's DICOM SR and SC objects.

The PDF is built with fpdf2 (pure Python): the original and hybrid image of every analysed instance, the
findings (call, probability against the operating point, type distribution), the models that made them
and the not-for-diagnostic-use statement in every page's footer.
"""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Response, abort, render_template, send_file
from flask_login import login_required
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from service.access import get_study_for
from service.models import Artifact, Instance, Patient
from service.portal import bp
from service.portal.common import (
    audit_user,
    call_label,
    db_session,
    display_name,
    fmt_da,
    fmt_time,
    me,
    pct,
    type_label,
)
from service.portal.views import image_bytes, load_study
from service.presenters import DISCLAIMER

if TYPE_CHECKING:
    from fpdf import FPDF

log = logging.getLogger(__name__)
ARTIFACT_NAMES = {"sc": "secondary-capture", "sr": "structured-report"}


@bp.get("/studies/<int:study_id>/report")
@login_required
def report(study_id: int) -> Any:
    with db_session() as s:
        _study, detail = load_study(s, study_id)
        audit_user(s, "report.view", object_type="study", object_id=study_id,
                   patient_id=detail["patient"]["patient_id"])
    return render_template("portal/report.html", d=detail)


def _latin1(text: Any) -> str:
    """fpdf2's core fonts are Latin-1: replace what they cannot draw."""
    value = str(text if text is not None else "")
    value = value.replace("—", "-").replace("–", "-").replace("•", "*").replace("≥", ">=").replace("≤", "<=")
    return value.encode("latin-1", "replace").decode("latin-1")


@functools.cache
def _report_pdf_class() -> type[FPDF]:
    """The report's page layout, an fpdf2 document class. fpdf2 is imported on the first report rather than with
    the web app: it is about 19 MiB of a web process that may never draw a PDF (the node's memory budget,
    README "Performance")."""
    from fpdf import FPDF

    class ReportPDF(FPDF):
        title_text = "FractureNode study report"

        def header(self) -> None:
            self.set_font("Helvetica", "B", 13)
            self.set_text_color(20, 40, 70)
            self.cell(0, 8, self.title_text, new_x="LMARGIN", new_y="NEXT")
            self.set_draw_color(20, 90, 160)
            self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
            self.ln(3)
            self.set_text_color(0, 0, 0)

        def footer(self) -> None:
            self.set_y(-15)
            self.set_font("Helvetica", "B", 8)
            self.set_text_color(170, 30, 30)
            self.cell(0, 5, _latin1(f"{DISCLAIMER} Results of AI models trained on synthetic radiographs; "
                                    "not cleared by any regulator."), align="C", new_x="LMARGIN", new_y="NEXT")
            self.set_font("Helvetica", "", 8)
            self.set_text_color(90, 90, 90)
            self.cell(0, 4, f"Page {self.page_no()}/{{nb}}", align="C")

    return ReportPDF


def _kv(pdf: FPDF, key: str, value: Any) -> None:
    pdf.set_font("Helvetica", "B", 9)
    pdf.cell(45, 5.5, _latin1(key))
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(0, 5.5, _latin1(value), new_x="LMARGIN", new_y="NEXT")


def build_pdf(detail: dict[str, Any], images: dict[int, dict[str, bytes]]) -> bytes:
    """The report as PDF bytes. ``images`` maps instance id -> {"original": png, "hybrid": png}."""
    pdf = _report_pdf_class()(format="A4")
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.set_title(f"FractureNode report, study {detail['id']}")
    pdf.set_creator("FractureNode")
    pdf.add_page()
    patient = detail["patient"]
    _kv(pdf, "Patient", f"{display_name(patient['name']) or '-'} (ID {patient['patient_id'] or '-'})")
    _kv(pdf, "Study", f"#{detail['id']}  date {fmt_da(detail['study_date']) or '-'}  accession "
                      f"{detail['accession_number'] or '-'}")
    _kv(pdf, "Description", detail["description"] or "-")
    _kv(pdf, "Referring physician", display_name(detail["referring_physician_name"]) or "-")
    _kv(pdf, "Status", f"{detail['status']}; overall result: {call_label(detail['result'])}")
    _kv(pdf, "Received", fmt_time(detail["created_at"]))
    for number, inst in enumerate(detail["instances"], start=1):
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        where = " ".join(x for x in (inst["body_part"], inst["laterality"], inst["modality"]) if x)
        pdf.cell(0, 7, _latin1(f"Image {number}: {where or 'radiograph'}"), new_x="LMARGIN", new_y="NEXT")
        result = inst["result"]
        pngs = images.get(inst["id"], {})
        if pngs:
            width = (pdf.w - pdf.l_margin - pdf.r_margin - 6) / 2
            height = 80.0
            if pdf.get_y() + height + 8 > pdf.h - 20:
                pdf.add_page()
            top = pdf.get_y()
            for column, (label, key) in enumerate((("Original", "original"), ("AI heatmap + edges (hybrid)",
                                                                               "hybrid"))):
                if key in pngs:
                    x = pdf.l_margin + column * (width + 6)
                    pdf.image(io.BytesIO(pngs[key]), x=x, y=top, w=width, h=height, keep_aspect_ratio=True)
                    pdf.set_xy(x, top + height + 1)
                    pdf.set_font("Helvetica", "", 8)
                    pdf.cell(width, 4, label, align="C")
            pdf.set_xy(pdf.l_margin, top + height + 7)
        if result is None:
            _kv(pdf, "Finding", f"not analysed ({inst['status']})")
            if inst["job"] and (inst["job"]["reason"] or inst["job"]["error"]):
                _kv(pdf, "Reason", inst["job"]["reason"] or inst["job"]["error"])
            continue
        if not result["validity"]["is_radiograph"]:
            _kv(pdf, "Finding", f"not analysed: {result['validity']['reason'] or 'not a radiograph'}")
        else:
            _kv(pdf, "Finding", call_label(result["call"]))
            _kv(pdf, "Fracture probability", f"{pct(result['fracture_probability'], 1)} (operating point "
                                            f"{pct(result['operating_point'], 1)})")
            if result["call"] == "indeterminate":
                _kv(pdf, "Note", "The model is uncertain about this image; it makes no yes/no call.")
            if result["call"] != "no_fracture" and result["top_type"]:
                _kv(pdf, "Most likely type", f"{type_label(result['top_type'])} "
                                             f"({pct(result['top_type_probability'], 1)})")
            dist = result["type_distribution"] or {}
            if dist:
                top = sorted(dist.items(), key=lambda kv: -float(kv[1]))[:5]
                _kv(pdf, "Type distribution", ", ".join(f"{type_label(k)} {pct(float(v))}" for k, v in top))
        models = result["models"] or [result["model"]]
        _kv(pdf, "Models", "; ".join(f"{m['name']} {m['version']}" for m in models if m.get("name")) or "-")
        for fb in inst.get("feedback", []):
            verdict = "agrees" if fb["agrees"] else "disagrees"
            extra = f", type {type_label(fb['correct_type'])}" if fb["correct_type"] else ""
            _kv(pdf, "Clinician feedback", f"{fb['by']} {verdict}{extra} ({fmt_time(fb['at'])})")
    pdf.ln(2)
    pdf.set_font("Helvetica", "B", 9)
    pdf.set_text_color(170, 30, 30)
    pdf.multi_cell(0, 5, _latin1(f"{DISCLAIMER} This report was generated automatically and has not been "
                                 "reviewed. It must not be used to make clinical decisions."),
                   new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


@bp.get("/studies/<int:study_id>/report.pdf")
@login_required
def report_pdf(study_id: int) -> Any:
    with db_session() as s:
        study, detail = load_study(s, study_id)
        images: dict[int, dict[str, bytes]] = {}
        for inst in detail["instances"]:
            instance = s.get(Instance, inst["id"])
            if instance is None:
                continue
            pngs: dict[str, bytes] = {}
            for kind in ("original", "hybrid"):
                if inst["available"].get(kind):
                    try:
                        pngs[kind] = image_bytes(s, instance, kind)
                    except HTTPException:  # a missing layer leaves a gap in the report, not a failed one
                        log.warning("study %s image %s: no %s layer for the PDF", study_id, inst["id"], kind)
            images[inst["id"]] = pngs
        audit_user(s, "report.pdf", object_type="study", object_id=study.id,
                   patient_id=detail["patient"]["patient_id"])
    data = build_pdf(detail, images)
    response = Response(data, mimetype="application/pdf")
    response.headers["Content-Disposition"] = f'attachment; filename="fracturenode-study-{study_id}.pdf"'
    response.headers["Cache-Control"] = "private, no-store"
    return response


@bp.get("/studies/<int:study_id>/artifacts/<int:artifact_id>")
@login_required
def artifact(study_id: int, artifact_id: int) -> Any:
    """Download a DICOM SC or SR object of the study (audited)."""
    with db_session() as s:
        study = get_study_for(s, me(), study_id)
        art = s.scalar(select(Artifact).where(Artifact.id == artifact_id, Artifact.study_pk == study.id))
        if art is None or art.kind not in ARTIFACT_NAMES or not Path(art.file_path).is_file():
            abort(404)
        patient = s.get(Patient, study.patient_pk)
        audit_user(s, "artifact.download", object_type="artifact", object_id=art.id,
                   patient_id=patient.patient_id if patient else None, detail={"kind": art.kind})
        path, kind = Path(art.file_path), art.kind
    response = send_file(path, mimetype="application/dicom", as_attachment=True,
                         download_name=f"study-{study_id}-{ARTIFACT_NAMES[kind]}-{artifact_id}.dcm",
                         max_age=0)
    response.headers["Cache-Control"] = "private, no-store"
    return response
