#!/usr/bin/env bash
# Final benchmark figures for issue 9 (run after 00:00 UTC); outputs in bench/results/.
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"; rm -f "$out"/*
run() { name=$1; shift; { echo "\$ $*"; echo "uptime before: $(uptime)"; "$@"; echo "exit $?"; echo "uptime after: $(uptime)"; } > "$out/$name.txt" 2>&1; }
run 1-ingest    .venv/bin/python bench/bench_ingest.py
run 2-e2e       .venv/bin/python bench/bench_e2e.py
run 3-pipeline1 .venv/bin/python bench/bench_pipeline.py
run 4-pipeline2 .venv/bin/python bench/bench_pipeline.py --workers 2 --images 40
run 5-load      .venv/bin/python bench/bench_load.py --timeout 780
run 6-e2e-poll0.1 .venv/bin/python bench/bench_e2e.py --studies 20 --poll-interval 0.1
run 7-worker-memory .venv/bin/python bench/bench_worker_memory.py
