#!/usr/bin/env bash
# The GPU measurements of issue 15 in one run of at most ~6 minutes, for a lent GPU machine:
#   env.log          wheels installed from .whl/, nvidia-smi, versions, the bf16 matmul rate (8192^3)
#   loss_bench.log   benchmarks/loss_bench.py: fused TAID / FKL (the torch closed form, and our Triton
#                    kernel as "auto/triton") vs full logits vs Liger's fused JSD,
#   loss_bench.json  N = 16,384, V = 151,936, H_s = H_t = 1536 and 3584, bf16
#   train_bench.log  benchmarks/train_bench.py --gpu: Qwen2-1.5B student <- Qwen2-7B teacher, tokens/s and MFU
#   suite.log        one line per part: exit status and seconds
# Each part runs under its own timeout, so one that fails or hangs leaves the others' results.
# Run from the repo root:  OUT=/some/folder bash benchmarks/gpu_suite.sh
# Check on a CPU (tiny sizes, no CUDA, Liger skipped, wheels only test-installed):
#   GPU_SUITE_SMOKE=1 OUT=/tmp/gpu_suite PATH=.venv/bin:$PATH bash benchmarks/gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
SMOKE=${GPU_SUITE_SMOKE:-0}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT builds (none expected: torch AdamW, shm op marked incompatible) land here; listed at the end.
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
T0=$(date +%s)

log_part() {  # NAME EXIT_STATUS START_SECONDS
    echo "$1: exit $2 after $(( $(date +%s) - $3 )) s (suite at $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/suite.log"
}

part() {  # NAME TIMEOUT_SECONDS COMMAND...: output to the terminal and $OUT/NAME.log
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    echo "=== $name (timeout ${limit} s): $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    log_part "$name" "${PIPESTATUS[0]}" "$start"
}

env_part() {
    local site=/tmp/site
    if [ "$SMOKE" = 1 ]; then
        # Python here is not the GPU image's 3.12: check that the wheels install for it, then use ours.
        site=/tmp/site_smoke
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_17_x86_64 .whl/*.whl && echo "wheels: test install for 3.12 ok ($site)"
        export PYTHONPATH=$PWD
    else
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            && echo "wheels: installed into $site"
        export PYTHONPATH=$site:$PWD
    fi
    ls .whl
    nvidia-smi || echo "nvidia-smi: not available"
    $PY - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "accelerate", "deepspeed", "liger_kernel", "pydantic", "webdataset"):
    try:
        m = importlib.import_module(name)
        print(f"{name:<13} {getattr(m, '__version__', '?'):<14} {m.__file__}")
    except Exception as e:
        print(f"{name:<13} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
}

start=$(date +%s)
env_part 2>&1 | tee "$OUT/env.log"
log_part env "${PIPESTATUS[0]}" "$start"
# env_part ran in a pipeline's subshell: set PYTHONPATH here too.
if [ "$SMOKE" = 1 ]; then export PYTHONPATH=$PWD; else export PYTHONPATH=/tmp/site:$PWD; fi

if [ "$SMOKE" = 1 ]; then
    DEVICE=(--device cpu --dtype float32)
    SIZES=64x32x32,64x48x48
    VOCAB=(--vocab 4096)
    TRAIN=(--gpu --smoke --steps 4 --warmup 1 --seq 256 --micro-batch 2 --trainer-timeout 240)
    LOSS_LIMIT=300; TRAIN_LIMIT=300; CHUNKS=auto,16; CHILD_LIMIT=240; KERNELS=torch
else
    DEVICE=(--device cuda --dtype bfloat16)
    SIZES=16384x1536x1536,16384x3584x3584
    VOCAB=()
    TRAIN=(--gpu --steps 10 --warmup 3 --trainer-timeout ${TRAINER_TIMEOUT:-145})
    LOSS_LIMIT=${LOSS_LIMIT:-150}; TRAIN_LIMIT=${TRAIN_LIMIT:-160}; CHUNKS=${CHUNKS:-auto}; CHILD_LIMIT=45; KERNELS=torch,triton
fi

MATMUL=()
if [ "$SMOKE" != 1 ]; then
    start=$(date +%s)
    TFLOPS=$(timeout 30 $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from loss_bench import measure_matmul_tflops as m; print(f'{m(\"cuda\"):.1f}')" 2>>"$OUT/env.log")
    echo "bf16 matmul 8192^3, mean of 10 after 3 warm-ups: ${TFLOPS:-FAILED} TFLOP/s" | tee -a "$OUT/env.log"
    if [ -n "${TFLOPS:-}" ]; then MATMUL=(--matmul-tflops "$TFLOPS"); log_part matmul 0 "$start"; else log_part matmul 1 "$start"; fi
fi

part loss_bench "$LOSS_LIMIT" $PY benchmarks/loss_bench.py "${DEVICE[@]}" "${VOCAB[@]}" --sizes "$SIZES" \
    --losses taid,fkl --chunk-sizes "$CHUNKS" --kernels "$KERNELS" --reps 5 --child-timeout "$CHILD_LIMIT" "${MATMUL[@]}" --json "$OUT/loss_bench.json"
part train_bench "$TRAIN_LIMIT" $PY benchmarks/train_bench.py "${TRAIN[@]}"
{ echo "torch extensions built (JIT) during the suite:"; ls -R "$TORCH_EXTENSIONS_DIR" 2>/dev/null || echo "  none"; } \
    | tee -a "$OUT/suite.log"
echo "suite done after $(( $(date +%s) - T0 )) s; files in $OUT:" | tee -a "$OUT/suite.log"
ls -la "$OUT"
