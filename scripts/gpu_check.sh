#!/usr/bin/env bash
# The prepared GPU run for issue 5 (docs/benchmarks.md, "GPU"): the scan and Pallas tests on
# the GPU, then the bench's gpu and layers suites. Everything lands under $OUT:
#   device.txt  jax version, devices, whether the Pallas kernel compiles and runs
#   tests.txt   pytest of the scan, Pallas, LRU and cell tests (TF32 off, so tolerances hold)
#   train.txt   20 steps of the default config, whose train.scan_choices=auto measures the
#               scan methods at its shapes on a GPU: what "auto" picks (train/scan_choices.json)
#   bench.txt   the bench tables; bench/bench.json, bench/scan.png, bench/scan_choices.json
#
# On the device machine (see ../shared/GPU.md; carry .whl, the wheels its image lacks):
#   bash scripts/gpu_check.sh
# Dry run on a CPU, tiny shapes (measuring there too):
#   OUT=/tmp/gpu-check BENCH_ARGS="--suite scan --lengths 64 --sizes 2x8 --repeats 2" \
#     TRAIN_ARGS=--config.train.scan_choices=measure bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
BENCH_ARGS=${BENCH_ARGS:---suite gpu --suite layers --repeats 5}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import ml_collections, mnist1d, pyjokes, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

python3 - <<'PY' 2>&1 | tee "$OUT/device.txt"
import jax
from lru_jax.kernels.pallas_scan import pallas_available

print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
print("pallas kernel compiles and runs:", pallas_available())
PY

# Tests compare methods at tight tolerances: full float32 matmuls (no TF32) for them only.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q \
  tests/test_pallas_scan.py tests/test_scan.py tests/test_scan_choices.py tests/test_lru.py \
  tests/test_cells.py \
  2>&1 | tee "$OUT/tests.txt"

# shellcheck disable=SC2086  # TRAIN_ARGS: extra flags, none by default
timeout 60 python3 train.py --workdir "$OUT/train" ${TRAIN_ARGS:-} \
  --config.train.num_steps=20 --config.train.eval_every=20 --config.train.eval_batches=1 \
  --config.generate.num_samples=0 2>&1 | tail -n 5 | tee "$OUT/train.txt"
rm -rf "$OUT/train/checkpoints" "$OUT/train/tensorboard"

# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout 300 python3 -m lru_jax.bench $BENCH_ARGS --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
