"""The one table that turns our exceptions into DIMSE statuses (PS3.4 B.2.3, C-STORE statuses).

A C-STORE handler lets :mod:`service.ingest` raise its own errors and returns
:func:`store_failure_status` of whatever was raised. Nothing that was not stored may answer Success, so
anything not in the table (a bug) is a failure too, logged with its traceback.
"""

from __future__ import annotations

import logging

from pydicom import Dataset

from service.ingest import (
    DatabaseUnavailable,
    DiskFull,
    InflatedTooLarge,
    InstanceTooLarge,
    InvalidInstance,
    OutOfResources,
    StorageUnavailable,
    UnreadableInstance,
)

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: Refused: Out of Resources (A7xx); the sender may retry later.
OUT_OF_RESOURCES_STORAGE_FULL = 0xA700
OUT_OF_RESOURCES_DATABASE = 0xA701
OUT_OF_RESOURCES_TOO_LARGE = 0xA702
OUT_OF_RESOURCES_STORAGE = 0xA703
#: Error: Data Set does not match SOP Class (A9xx).
DATASET_DOES_NOT_MATCH = 0xA900
#: Error: Cannot understand (Cxxx).
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0xC001

#: exception class -> (status, error comment prefix). Looked up along the exception's MRO, first match wins.
STATUS_TABLE: dict[type[BaseException], tuple[int, str]] = {
    DiskFull: (OUT_OF_RESOURCES_STORAGE_FULL, "Out of resources: storage full"),
    DatabaseUnavailable: (OUT_OF_RESOURCES_DATABASE, "Out of resources: database unavailable"),
    StorageUnavailable: (OUT_OF_RESOURCES_STORAGE, "Out of resources: storage error"),
    OutOfResources: (OUT_OF_RESOURCES_STORAGE, "Out of resources"),
    InflatedTooLarge: (OUT_OF_RESOURCES_TOO_LARGE, "Out of resources: deflated data set inflates too large"),
    InstanceTooLarge: (OUT_OF_RESOURCES_TOO_LARGE, "Out of resources: instance too large"),
    InvalidInstance: (DATASET_DOES_NOT_MATCH, "Data set does not match SOP class"),
    UnreadableInstance: (CANNOT_UNDERSTAND, "Cannot understand data set"),
}


def status_for(exc: BaseException) -> tuple[int, str]:
    """The status and error comment for ``exc`` (unknown exceptions: 0xC001 processing failure)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return PROCESSING_FAILURE, "Processing failure"


def store_failure_status(exc: BaseException) -> Dataset:
    """A C-STORE response status dataset (Status + ErrorComment, LO: at most 64 characters)."""
    status, comment = status_for(exc)
    if status == PROCESSING_FAILURE:
        log.error("C-STORE failed unexpectedly", exc_info=exc)
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response
