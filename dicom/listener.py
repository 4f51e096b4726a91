"""The DICOM listener: Verification (C-ECHO) and Storage SCP, guarded by the calling-AE allow-list.

Handlers are bound as ``(event, handler, [args])`` so they get their dependencies passed in. The C-STORE
handler is thin (PS3.4 B.2.3): it hands the encoded instance, exactly as received, to
:func:`service.ingest.ingest_file` (store the file, record instance and job in one transaction) and returns a
status. No decoding, no inference: the sender is waiting. Our exceptions become DIMSE statuses in
:mod:`dicom.status`.

Instances are received to disk, not to memory (:mod:`dicom.receive`): each dataset's fragments go to a file in
``<storage dir>/.incoming/<host>-<pid>`` as they arrive, deleted once the handler has answered. So the listener's memory
does not grow with the size of an instance or with the number of associations sending at once, an instance
over ``FRACTURE_MAX_UPLOAD_MB`` costs disk until it is refused, not memory, and a disk that fills up while an
instance arrives is answered 0xA700 (storage full), as when the store itself is full.

Accepted: the radiography storage SOP classes (CR, DX and intra-oral X-ray for presentation and for
processing, Secondary Capture) and, so that a PACS sending a whole study is not refused mid-way, the other
common image storage SOP classes; those are stored, recorded and then rejected by validation with a reason.
Transfer syntaxes: the uncompressed ones, deflate, JPEG Baseline/Extended/Lossless, JPEG-LS, JPEG 2000
and RLE (decoded later by the workers with the pylibjpeg plugins).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc
from pynetdicom.transport import ThreadedAssociationServer

from config import Settings
from dicom import receive
from dicom.net import set_tcp_nodelay, use_fast_recv
from dicom.status import SUCCESS, store_failure_status

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

def _uids(*names: str) -> list[str]:
    """Storage SOP Class UIDs by their pynetdicom names."""
    return [str(getattr(sc, name)) for name in names]


#: What FractureNode analyses (PS3.4 B.5).
RADIOGRAPHY_SOP_CLASSES: list[str] = _uids(
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "DigitalIntraOralXRayImageStorageForPresentation",
    "DigitalIntraOralXRayImageStorageForProcessing",
    "SecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
)

#: Accepted so that a whole study is not refused; recorded, then rejected by validation with a reason.
OTHER_IMAGE_SOP_CLASSES: list[str] = _uids(
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage", "NuclearMedicineImageStorage",
    "PositronEmissionTomographyImageStorage", "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing", "BreastTomosynthesisImageStorage",
    "XRayAngiographicImageStorage", "EnhancedXAImageStorage", "XRayRadiofluoroscopicImageStorage",
    "EnhancedXRFImageStorage", "XRay3DAngiographicImageStorage", "XRay3DCraniofacialImageStorage",
    "MultiFrameSingleBitSecondaryCaptureImageStorage", "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "VLPhotographicImageStorage", "RTImageStorage",
)


def _peer(event: Any) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


def _log_request(event: Any, settings: Settings) -> None:
    """``EVT_REQUESTED``: log every association request, and each one the allow-list refuses."""
    primitive = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ: the AE titles are not copied yet
    calling = str(getattr(primitive, "calling_ae_title", "") or event.assoc.requestor.ae_title).strip()
    called = str(getattr(primitive, "called_ae_title", "") or event.assoc.acceptor.ae_title).strip()
    peer = _peer(event)
    if settings.allowed_calling_aes and calling not in settings.allowed_calling_aes:
        log.warning("refusing association from %s: calling AE %r is not allowed", peer, calling)
    elif called != settings.ae_title:
        log.warning("refusing association from %s: called AE %r is not %r", peer, called, settings.ae_title)
    else:
        log.info("association request from %s (calling AE %r)", peer, calling)


def _log_aborted(event: Any) -> None:
    log.warning("association from %s aborted; anything not completely received was not stored", _peer(event))


def _discard_partial(event: Any) -> None:
    """``EVT_CONN_CLOSE``: remove the file of an instance whose transfer the connection cut off (what a killed
    listener left, the next one's start removes: see :mod:`dicom.receive`)."""
    if receive.discard_partial(getattr(getattr(event.assoc, "dimse", None), "message", None)):
        log.info("removed the partial instance of a transfer from %s that did not finish", _peer(event))


def _handle_echo(event: Any) -> int:
    return SUCCESS


def handle_store(event: Any, settings: Settings, db: Any) -> int | Dataset:
    """``EVT_C_STORE``: hand the received instance to ``ingest_file`` and answer Success or a failure status."""
    from service.ingest import ingest, ingest_file, storage_failure

    try:
        calling_ae = event.assoc.requestor.ae_title.strip() or None
        path = event.dataset_path  # None where the dataset was received to memory
        if isinstance(path, Path):
            error = receive.finish(path)
            if error is not None:
                raise storage_failure(error, "receiving the instance")
            ingest_file(db, settings, path, source="dicom", calling_ae=calling_ae,
                        peer_address=event.assoc.requestor.address, link=True)
        else:  # received to memory: pynetdicom's default, where receive_to_disk() was not called
            ingest(db, settings, event.encoded_dataset(include_meta=True), source="dicom", calling_ae=calling_ae,
                   peer_address=event.assoc.requestor.address)
    except Exception as exc:  # noqa: BLE001 - every failure must become a failure status, never Success
        status = store_failure_status(exc)
        log.warning("C-STORE of %s from %s refused with 0x%04X: %s", event.request.AffectedSOPInstanceUID,
                    _peer(event), int(status.Status), exc)
        return status
    return SUCCESS


def build_ae(settings: Settings) -> AE:
    """An AE configured from settings: our title, the allow-list, the called-AE check, storage contexts."""
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.maximum_pdu_size = 0  # no limit: large radiographs in few PDUs
    ae.network_timeout = 60
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.maximum_associations = settings.max_associations
    ae.add_supported_context(VERIFICATION)
    for sop_class in RADIOGRAPHY_SOP_CLASSES + OTHER_IMAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def handlers(settings: Settings, db: Any) -> list[Any]:
    return [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, use_fast_recv),
        (evt.EVT_REQUESTED, _log_request, [settings]),
        (evt.EVT_ABORTED, _log_aborted),
        (evt.EVT_CONN_CLOSE, _discard_partial),
        (evt.EVT_C_ECHO, _handle_echo),
        (evt.EVT_C_STORE, handle_store, [settings, db]),
    ]


def start_listener(settings: Settings, *, block: bool = False, db: Any = None) -> ThreadedAssociationServer | None:
    """Start listening on ``settings.dicom_host:dicom_port``. With ``block=False`` returns the server.

    ``db`` (a :class:`service.db.Database`) defaults to one made from settings; instances are stored under
    ``settings.storage_dir``.
    """
    from service.db import Database

    settings.ensure_dirs()
    database = db if db is not None else Database.from_settings(settings)
    receive.receive_to_disk(settings.storage_dir / receive.FOLDER)
    receive.sweep(settings.storage_dir / receive.FOLDER)  # what a listener killed mid-transfer left
    ae = build_ae(settings)
    address = (settings.dicom_host, settings.dicom_port)
    log.info("DICOM listener %s on %s:%s", settings.ae_title, *address)
    return ae.start_server(address, block=block, evt_handlers=handlers(settings, database))
