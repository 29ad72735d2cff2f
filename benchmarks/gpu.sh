#!/usr/bin/env bash
# The benchmarks on a GPU machine, unchanged: `bash benchmarks/gpu.sh [OUT_DIR]` from the repository root.
#
# Written for the device machines lent to this project (`device` tool): CUDA JAX, Flax, Optax, orbax, PyTorch,
# scikit-learn and matplotlib are installed there and nothing can be downloaded, so adabatch runs from the source
# tree (PYTHONPATH) instead of being installed. The PyTorch peers that are not there (Opacus, BackPACK, PyHessian)
# can travel as wheels in .whl/ (see the device tool's README); without them those rows are marked as missing.
# Results go to OUT_DIR/benchmarks-gpu.md (default $OUT, else /tmp/adabatch-gpu), one section per benchmark with
# the command and the machine, as docs/benchmarks.md has them for the CPU; copy what you keep into
# docs/benchmarks.md under a heading that says GPU.
set -euo pipefail
out="${1:-${OUT:-/tmp/adabatch-gpu}}"
mkdir -p "$out"
report="$out/benchmarks-gpu.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # optional peers carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/adabatch-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/adabatch-site"
fi
python3 - <<'PY'
import jax
devices = jax.devices()
print("devices:", devices)
if devices[0].platform != "gpu":
    raise SystemExit("benchmarks/gpu.sh: no GPU visible to JAX; run the CPU benchmarks with `adabatch bench` instead")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
run() { echo "+ adabatch $*"; python3 -m adabatch.cli "$@"; }
# Per-example statistics: every model of issue 12 (linen and NNX), B = 64…1024, PyTorch peers on the same GPU.
run bench stats --models mlp,cnn,lm,embed,conv1d,seq5,nnx --sizes 64,256,1024 --out "$report"
# Curvature: HVP, Lanczos step and SLQ spectra against a plain gradient, PyHessian on the PyTorch twins.
run bench curvature --models mlp,cnn,lm --out "$report"
# The training step against hand-written jitted loops.
run bench train-step --markdown | tee "$out/train_step.md"
echo "wrote $report"
