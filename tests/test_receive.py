"""dicom.receive on its own: the file a dataset is received to keeps its write errors for the handler, and the
sweep removes only what a killed listener left. (The listener's behaviour with it, over real associations:
tests/test_listener.py, the aborted transfer and the full disk.)"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from pathlib import Path

from dicom import receive


def test_a_file_that_cannot_be_made_drops_the_data_and_tells_the_handler(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    incoming = receive.IncomingFile(blocker / "incoming")  # its "folder" is a file: nothing can be made there
    assert incoming.write(b"x" * 1000) == 1000  # pynetdicom's network thread never sees the error
    incoming.file.flush()
    error = receive.finish(Path(incoming.name))
    assert isinstance(error, OSError) and error.errno in (errno.ENOTDIR, errno.EEXIST)
    incoming.close()
    assert receive.finish(Path(incoming.name)) is None  # closed: no longer known


def test_a_file_received_whole_has_no_error_and_holds_every_byte(tmp_path: Path) -> None:
    incoming = receive.IncomingFile(tmp_path / "incoming")
    for piece in (b"\0" * 128, b"DICM", b"abc" * 5000):
        incoming.write(piece)
        incoming.file.flush()
    path = Path(incoming.name)
    assert path.parent == tmp_path / "incoming" and path.name.startswith(receive.PREFIX)
    assert receive.finish(path) is None  # the handler reads the file while pynetdicom still holds it open
    assert path.read_bytes() == b"\0" * 128 + b"DICM" + b"abc" * 5000
    incoming.close()


def test_the_sweep_removes_dead_listeners_partials_and_only_stale_ones_elsewhere(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs (a listener killed mid-transfer)
    folders = {name: tmp_path / name for name in (f"{host}-{dead.pid}", f"{host}-{os.getpid()}", "otherhost-1")}
    an_hour_ago = time.time() - 3600
    for folder in folders.values():
        folder.mkdir()
        for age, when in (("new", None), ("old", an_hour_ago)):
            path = folder / f"{receive.PREFIX}{age}.dcm"
            path.write_bytes(b"partial")
            if when:
                os.utime(path, (when, when))
    (folders["otherhost-1"] / "not-ours.dcm").write_bytes(b"")
    assert receive.sweep(tmp_path, older_than=600) == 4  # both of the dead one's, the old one of each other
    assert not folders[f"{host}-{dead.pid}"].exists()
    assert sorted(p.name for p in folders[f"{host}-{os.getpid()}"].iterdir()) == [f"{receive.PREFIX}new.dcm"]
    assert sorted(p.name for p in folders["otherhost-1"].iterdir()) == [f"{receive.PREFIX}new.dcm", "not-ours.dcm"]
