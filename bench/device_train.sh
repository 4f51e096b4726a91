#!/usr/bin/env bash
# Train the detector on a lent GPU machine in one call, and bring the bundle back.
#
#   bash bench/device_train.sh prepare      # here, once per checkout: the wheels the GPU machine lacks, in .whl/
#   bash bench/device_train.sh run          # there, through the device tool: run(command="bash
#                                           #   bench/device_train.sh run", carry=[".whl"], timeout_s=590)
#
# "run" checks the machine (CUDA visible, the device tests pass there), writes the training sets with the
# generator on every core (the same seeds as the CPU runs in docs/MODELS.md, so the comparison is about compute),
# trains `fracture-node train --task fracture --device cuda` for FN_MINUTES, refits the whole-image heads and the
# Platt calibration on cal + sel there, and leaves in $OUT: the detector bundle, its training log and this
# script's log. Everything after that (the reader's card refitted behind it, fresh held-out sets, the paired
# comparison) runs on the CPU here, as for every CPU run (docs/MODELS.md, "Training on a GPU").
#
# Settings (environment; defaults in brackets):
#   FN_MINUTES [5]        the training budget (the schedule is fitted to it from the measured speed)
#   FN_INIT [pipeline/models/bundled/detector]   where training starts ("none": from scratch)
#   FN_WIDTH []           backbone width (default: the --init's; wider widens it function-preserving)
#   FN_LONG_SIDE [768]    the detector's input long side; FN_CROP [256] the training crop
#   FN_BATCH [64]         crops per step; FN_LR [3e-4] peak learning rate
#   FN_SEED [5001]        training seed
#   FN_TRAIN ["1001:1200 1101:2400 1201:3000"]   generator seed:count of each training set
#   FN_EXTRA []           more `fracture-node train` options, e.g. "--site-share 0.3 --rotate 0.3"
#   FN_HELD ["va:300:2002 cal:600:3003 sel:600:4004"]   name:count:seed of the monitoring set (va) and the
#                         calibration sets (cal, sel) the Platt scaling is fitted on
#   FN_SKIP_TESTS []      1: do not run tests/test_training_device.py first
#   FN_DEVICE [cuda]      cpu: the same steps without a GPU (what tests/test_device_train_script.py runs, tiny)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in
prepare)
    # pydicom is the one package `synth` and `train` import that the GPU machine's image lacks (checked with a
    # virtual environment holding only that image's packages); pure Python, so any platform's wheel serves.
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    version=$(.venv/bin/python -c 'import pydicom; print(pydicom.__version__)')
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .whl "pydicom==$version"
    ls -l .whl
    exit 0
    ;;
run) ;;
*)
    echo "usage: bash bench/device_train.sh prepare|run" >&2
    exit 2
    ;;
esac

OUT=${OUT:?run this through the device tool, which sets OUT (the folder whose files come back)}
log="$OUT/device_train.log"
exec > >(tee "$log") 2>&1
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
node() { $PY -c 'import sys; from service.cli import main; sys.argv[0] = "fracture-node"; main()' "$@"; }

cores=$(nproc)
stamp "machine: $cores cores"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
device=${FN_DEVICE:-cuda}
$PY - "$device" <<'EOF'
import sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
if sys.argv[1] != "cpu" and not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA GPU here: nothing to train on")
EOF

if [ "${FN_SKIP_TESTS:-}" != 1 ]; then
    stamp "tests/test_training_device.py (the CPU and the CUDA variants)"
    # --noconftest: the suite's conftest starts the service's parts, whose packages this image lacks;
    # -p no:warnings: another torch's deprecation warnings are not this run's failures. A failing test is
    # reported and the training still runs: the lease is spent either way, and its log says which test failed.
    $PY -m pytest -q --noconftest -p no:cacheprovider -p no:warnings -o addopts="" tests/test_training_device.py \
        || stamp "DEVICE TESTS FAILED (above); training anyway"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fn-device.XXXXXX")
data=$work/data
sets=()
for item in ${FN_TRAIN:-1001:1200 1101:2400 1201:3000}; do
    seed=${item%%:*}
    count=${item##*:}
    stamp "synth: $count radiographs, seed $seed"
    node synth --quiet --workers "$cores" --long-side 1024 --out "$data/tr$seed" --count "$count" --seed "$seed"
    sets+=(--data "$data/tr$seed")
done
for item in ${FN_HELD:-va:300:2002 cal:600:3003 sel:600:4004}; do
    IFS=: read -r name count seed <<< "$item"
    stamp "synth: $name, $count radiographs, seed $seed"
    node synth --quiet --workers "$cores" --long-side 1024 --out "$data/$name" --count "$count" --seed "$seed"
done

init=()
if [ "${FN_INIT:-pipeline/models/bundled/detector}" != none ]; then
    init=(--init "${FN_INIT:-pipeline/models/bundled/detector}")
fi
width=()
[ -n "${FN_WIDTH:-}" ] && width=(--width "$FN_WIDTH")
stamp "train: ${FN_MINUTES:-5} minutes on $device"
# shellcheck disable=SC2086  # FN_EXTRA is a list of options
node train --task fracture "${sets[@]}" --val-data "$data/va" --calibration-data "$data/cal" \
    --calibration-data "$data/sel" --out "$work/out" --checkpoint-dir "$OUT/checkpoint" "${init[@]}" "${width[@]}" \
    --long-side "${FN_LONG_SIDE:-768}" --crop "${FN_CROP:-256}" --batch-size "${FN_BATCH:-64}" \
    --lr "${FN_LR:-3e-4}" --epochs 200 --max-minutes "${FN_MINUTES:-5}" --crops-per-image 3 --epochs-per-round 2 \
    --workers "$cores" --threads "$cores" --val-limit 200 --augment 0.6 --head-images 1500 --cache-mb 20000 \
    --type-weight 0 --seed "${FN_SEED:-5001}" --processing 0.6 --zoom-out 0.3 --noise-max 0.06 \
    --device "$device" --quiet ${FN_EXTRA:-}
cp -r "$work/out/detector" "$OUT/detector"
rm -f "$OUT/checkpoint/checkpoint.pt"  # 10 MB and more: the bundle is what comes back
stamp "done: $OUT/detector"
ls -l "$OUT" "$OUT/detector"
rm -rf "$work"
