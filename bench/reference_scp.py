"""Reference receivers for ``bench_ingest.py``: FractureNode's own pynetdicom AE (same presentation contexts,
PDU size, TCP_NODELAY and socket reader as ``fracture-node listen``) with a C-STORE handler that does less than
the listener's, to show where the listener's time per image goes:

    receive   take the encoded instance (``event.encoded_dataset``) and answer Success: the ceiling of the
              pynetdicom stack itself, before any work of ours
    durable   also store it as the listener does (SHA-256, temp file, fsync, rename, folder fsync; no header
              parse, no database): the floor that durability adds

    .venv/bin/python bench/reference_scp.py PORT receive|durable STORE_DIR

Not a product path: nothing is recorded and nothing is analysed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pynetdicom import evt  # noqa: E402

from config import Settings  # noqa: E402
from dicom.listener import build_ae  # noqa: E402
from dicom.net import set_tcp_nodelay, use_fast_recv  # noqa: E402
from service.storage import store_bytes  # noqa: E402

MODES = ("receive", "durable")


def main() -> None:
    port, mode, store_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    if mode not in MODES:
        sys.exit(f"mode must be one of {MODES}")

    def handle_store(event: Any) -> int:
        data = event.encoded_dataset(include_meta=True)
        if mode == "durable":
            store_bytes(store_dir, data)
        return 0x0000

    settings = Settings.from_env({}, data_dir=store_dir, dicom_host="127.0.0.1", dicom_port=port)
    ae = build_ae(settings)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[
        (evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_CONN_OPEN, use_fast_recv), (evt.EVT_C_STORE, handle_store),
    ])


if __name__ == "__main__":
    main()
