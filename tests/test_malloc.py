"""service.malloc: a tuned process hands large freed buffers back to the system, whichever thread freed them.

What the listener and the web server rely on (one thread per association or request, each holding a received
instance for a moment): run in a fresh interpreter, so that this test process's heap does not blur the figure.
The listener's and the web server's figures under load are `bench/bench_load.py`'s (README, "Memory").
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from service import malloc

PROBE = textwrap.dedent("""
    import re, sys, threading
    from service.malloc import release_memory, tune_malloc

    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

    assert tune_malloc()
    before = rss()
    held = []
    barrier = threading.Barrier(8)

    def receive(i):
        for _ in range(3):  # three instances of 12 MiB per "association", as a PACS pushes a study
            data = bytes([i]) * (12 << 20)
            barrier.wait()
            held.append(len(data))
            barrier.wait()
            del data

    threads = [threading.Thread(target=receive, args=(i,)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    release_memory()
    print(before, rss(), sum(held) >> 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or malloc._libc() is None
                    or getattr(malloc._libc(), "mallopt", None) is None, reason="glibc only")
def test_tuned_process_returns_large_buffers_freed_by_many_threads() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, after, moved = map(int, out.stdout.split())
    assert moved == 8 * 3 * 12  # 288 MiB passed through, 96 MiB of it at once
    assert after - before < 16, f"RSS {before} MiB before, {after} MiB after: freed buffers were kept"

