#!/usr/bin/env bash
# Trainer checks that need a GPU (Transformer Engine layers, FP8, NCCL). Run from the repo root on
# a machine with torch+CUDA, Transformer Engine and megatron-rift installed (e.g. the Dockerfile's
# image):   bash tests/gpu/run_gpu_checks.sh [OUT_DIR]
# Writes OUT_DIR/gpu_checks.log and OUT_DIR/train_step_benchmark.md.
set -euo pipefail
OUT="${1:-gpu_check_output}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU" | tee "$OUT/gpu_checks.log"
"$PY" -c "import torch, transformer_engine; print('torch', torch.__version__, 'TE', transformer_engine.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))" | tee -a "$OUT/gpu_checks.log"

# 1. FP8 (hybrid, delayed scaling) vs bf16 on TE layers, and TE's THD packed path vs unpacked.
"$PY" -m pytest tests/test_train_fp8.py -q -rs --basetemp="$OUT/pytest_fp8" 2>&1 | tee -a "$OUT/gpu_checks.log"

# 2. Parallel equivalence and resume on NCCL (each run uses 2 GPUs).
if [ "$NGPU" -ge 2 ]; then
  "$PY" -m pytest tests/test_train_parallel.py tests/test_train_resume.py -q -rs \
      --basetemp="$OUT/pytest_parallel" 2>&1 | tee -a "$OUT/gpu_checks.log"
else
  echo "skipping NCCL parallel/resume tests: they need 2 GPUs" | tee -a "$OUT/gpu_checks.log"
fi

# 3. Step throughput and peak memory per objective (torch.cuda.max_memory_allocated), bf16-free
#    fp32 model as on CPU plus a realistic vocabulary.
"$PY" benchmarks/train_step.py --vocab-size 32768 --seq-length 1024 --micro-batch-size 8 \
    --hidden-size 512 --num-layers 4 --num-attention-heads 8 --rounds 40 \
    | tee "$OUT/train_step_benchmark.md"

# 4. --cross-entropy-loss-fusion: the fused output layer + CE at Qwen2.5-1.5B's shape with 8192
#    tokens (torch.cuda.max_memory_allocated; fp32 and bf16), and, with 2 or more GPUs, its parity,
#    training and resume tests on NCCL.
"$PY" benchmarks/output_layer.py --tokens 8192 --rounds 5 | tee "$OUT/output_layer_benchmark.md"
if [ "$NGPU" -ge 2 ]; then
  "$PY" -m pytest tests/test_linear_cross_entropy.py -q -rs --basetemp="$OUT/pytest_fused_ce" \
      2>&1 | tee -a "$OUT/gpu_checks.log"
fi
