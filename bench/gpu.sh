#!/usr/bin/env bash
# The GPU measurements on the lent machine (bench/README.md, "On a GPU"), after
# `bash .devwhl/c2/install.sh && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1`.
# Every stage has its own timeout and writes into $RESULTS, packed at the end into one archive under $OUT
# (few files come back from that machine), so a slow stage cannot lose the others'. The stages take up
# to 150 + 120 + 270 + 270 s, more than one device call's 600 s: run them in two calls on the warm
# machine, STAGES="build parity q4" then STAGES=bf16 (and STAGES=serve, with the server's wheels;
# STAGES=quant, the quantization check against the conversion).
set -u
OUT=${OUT:-/tmp/bench-out}
RESULTS=${RESULTS:-/tmp/bench-results}
PRESET=${PRESET:-4b}  # PRESET=tiny tries the script on a CPU first (its bfloat16 stages time out there)
STAGES=${STAGES:-build parity q4 bf16}
stage() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT" "$RESULTS"
export MLX_QWEN3VL_BENCH_CACHE=/tmp/bench-cache
python - > "$RESULTS/versions.txt" 2>&1 <<'PY'
import mlx.core as mx, mlx_lm, mlx_vlm, torch, transformers
print("mlx", mx.__version__, mx.default_device(), mx.device_info())
print("mlx-lm", mlx_lm.__version__, "mlx-vlm", mlx_vlm.__version__)
print("torch", torch.__version__, torch.cuda.is_available(), "transformers", transformers.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >> "$RESULTS/versions.txt" 2>&1

# 1. Random 4B weights, built here (never carried), directly in bfloat16 (--fast-build).
stage build && { timeout 150 python bench/presets.py $PRESET 0 0 fast > "$RESULTS/build.log" 2>&1 || echo "build failed" >> "$RESULTS/build.log"; }

# 2. The GPU path against transformers on this device: the tests' prompts and decode steps, float32 and
#    bfloat16 (bench/gpu_parity.py).
stage parity && timeout 120 python bench/gpu_parity.py "$RESULTS/parity.jsonl" > "$RESULTS/parity.log" 2>&1

# 3. 4-bit, the headline targets: decode vs mlx-vlm (>= 2x) and mlx-lm (>= 1.2x), prefill, vision,
#    TTFT, chat, memory, graph nodes per step (both counts: this backend's and fused-as-one).
COMMON="--preset $PRESET --fast-build --runs 3 --warmup 1 --load-runs 1 --tokens 128 --chat-tokens 16 --timeout 200"
stage q4 && timeout 270 python bench/bench.py $COMMON --quantize 4 --compare mlx-vlm,mlx-lm \
    --json "$RESULTS/4b_q4.json" > "$RESULTS/4b_q4.md" 2> "$RESULTS/4b_q4.log"

# 4. bfloat16 against mlx-vlm, mlx-lm and transformers (CUDA).
stage bf16 && timeout 270 python bench/bench.py $COMMON --compare mlx-vlm,mlx-lm,transformers \
    --json "$RESULTS/4b_bf16.json" > "$RESULTS/4b_bf16.md" 2> "$RESULTS/4b_bf16.log"
# 5. The server (bench/serve.py): throughput at 1/4/8 streams, the image conversation's second-request
#    TTFT, decode with a JSON schema; needs the server's wheels (prepare_wheels.sh fastapi uvicorn ...).
stage serve && timeout 300 python bench/serve.py --preset $PRESET --dtype bfloat16 --compare mlx-vlm --runs 2 \
    --timeout 120 --json "$RESULTS/serve.json" > "$RESULTS/serve.md" 2> "$RESULTS/serve.log"
# 6. The quantization check against the conversion (bench/quant.py): ours with its check inside, and
#    mlx-vlm's converter, at the 4B widths with 12 decoder layers (the ratio does not depend on the layers).
stage quant && timeout 400 python bench/quant.py --layers 12 --json "$RESULTS/quant.json" \
    > "$RESULTS/quant.md" 2> "$RESULTS/quant.log"
tar czf "$OUT/results-$(echo $STAGES | tr ' ' '-').tgz" -C "$RESULTS" .
ls -la "$RESULTS" "$OUT"
