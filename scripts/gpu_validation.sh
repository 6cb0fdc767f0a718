#!/usr/bin/env bash
# The CUDA validation (issues "CUDA backend" and "fast eviction") in one call sequence on a GPU machine.
#
#   bash scripts/gpu_validation.sh [OUT_DIR]          # after the README's install command
#
# Steps run in order of importance, so that a session cut short still leaves the main results; each
# step's output goes to OUT_DIR/<step>.txt (default docs/results/records/gpu-<date>), its command and
# exit status to OUT_DIR/commands.txt. A failing step is recorded and the next one runs.
# Environment: PYTHON (default: .venv/bin/python, else python3), CUDA_ARCH (default 90: H100/H200),
# SKIP_BUILD=1 to reuse an installed CUDA build, QUICK=1 for the smaller depth lists.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-docs/results/records/gpu-$(date -u +%Y%m%d-%H%M)}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ARCH=${CUDA_ARCH:-90}
mkdir -p "$OUT"

step() {
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$OUT/commands.txt"
    "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/commands.txt"
    tail -n 25 "$OUT/$name.txt"
}

if [ "${QUICK:-0}" = 1 ]; then
    DEPTHS_1B=4096,16384,65536
    DEPTHS_8B=4096,16384
else
    DEPTHS_1B=4096,16384,32768,65536,131072
    DEPTHS_8B=4096,16384,32768,65536
fi

{ date -u; nvidia-smi; nproc; } > "$OUT/device.txt" 2>&1
git rev-parse HEAD >> "$OUT/device.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step build "$PY" scripts/build_patched.py --cuda --cuda-arch "$ARCH"
fi
step doctor "$PY" -m l2kv_cpp.cli doctor
if ! "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)"; then
    echo "the installed llama.cpp has no GPU backend: stopping (build with --cuda, or unset SKIP_BUILD)" >&2
    exit 1
fi

# correctness: the same tokens kept on the GPU as on the CPU, then the suite with every layer offloaded
step test_gpu "$PY" -m pytest -rs -q tests/test_gpu.py
step bench_1b "$PY" scripts/bench_long_context.py --synthetic llama-3.2-1b --gpu-layers -1 \
    --budget 4096 --batch 512 --depths "$DEPTHS_1B"
step suite_offloaded env L2KV_TEST_N_GPU_LAYERS=-1 "$PY" -m pytest -q -rs
# the norm nodes' own cost (prompt and generation with eviction off vs on, budget never reached) and each
# policy's time per event split into features / ranking / moves
step bench_eviction_1b "$PY" scripts/bench_eviction.py --synthetic llama-3.2-1b --gpu-layers -1 \
    --budget 4096 --batch 512 --no-tiny
# the norm read after RoPE (breaks CUDA's ROPE+VIEW+SET_ROWS fusion) vs before it (the default)
step bench_1b_norm_after_rope env LLAMA_L2KV_NORM_AFTER_ROPE=1 "$PY" scripts/bench_long_context.py \
    --synthetic llama-3.2-1b --gpu-layers -1 --budget 4096 --batch 512 --depths 4096,16384
# a larger slack (one eviction per 4 batches): fewer events against attention over up to 6144 cells
step bench_1b_slack "$PY" scripts/bench_long_context.py --synthetic llama-3.2-1b --gpu-layers -1 \
    --budget 4096 --batch 512 --slack 2048 --depths 16384,65536
# the paper's rule: no key cosines, so the event is the norm read-back, the ranking and the moves
step bench_1b_l2 "$PY" scripts/bench_long_context.py --synthetic llama-3.2-1b --gpu-layers -1 \
    --budget 4096 --batch 512 --policy keep-low-norm --depths 16384,65536
step bench_8b "$PY" scripts/bench_long_context.py --synthetic llama-3-8b --gpu-layers -1 \
    --budget 4096 --batch 512 --depths "$DEPTHS_8B"

echo "results in $OUT"
