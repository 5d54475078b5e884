#!/usr/bin/env bash
# The checks that need a GPU, in one run of at most ~8 minutes on one H100/H200:
#   1. tests/test_train_fp8.py (Transformer Engine layers, FP8, TE's THD packed path)
#   2. every objective for 5 bf16 steps on a Qwen2.5-0.5B-shaped model with TE layers, and FP8 on
#      against off (benchmarks/gpu_objectives.py)
#   3. benchmarks/train_step.py: rift vs sft tokens/s and torch.cuda.max_memory_allocated
#   4. benchmarks/loss.py on the GPU
#   5. benchmarks/output_layer.py: the fused output layer + CE against the unfused path, 8192 tokens
# Writes OUT/gpu_check.json (and each step's log). Without a CUDA GPU it prints one line and exits 0.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default gpu_check_output/
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible here; nothing to check"
    exit 0
fi
OUT="${1:-gpu_check_output}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {  # name timeout command...: run, record exit code and seconds
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "{\"step\": \"$name\", \"exit\": $code, \"seconds\": $((SECONDS - started))}" >> "$OUT/steps.jsonl"
    echo "gpu_check: $name exit $code ($((SECONDS - started)) s)"
}
rm -f "$OUT/steps.jsonl"
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" > "$OUT/device.txt" 2>&1
step fp8_tests 120 "$PY" -m pytest tests/test_train_fp8.py -q -rs --basetemp="$OUT/pytest_fp8"
step objectives 240 "$PY" benchmarks/gpu_objectives.py "$OUT/objectives" --steps 5 --timeout 60
step train_step 90 "$PY" benchmarks/train_step.py --vocab-size 151936 --seq-length 2048 \
    --micro-batch-size 4 --hidden-size 896 --num-layers 4 --num-attention-heads 14 --rounds 10 --json
step loss 60 "$PY" benchmarks/loss.py --repeats 5 --json "$OUT/loss.json"
step output_layer 90 "$PY" benchmarks/output_layer.py --tokens 8192 --rounds 3
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {"device": (out / "device.txt").read_text().strip(),
          "steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]}
for name in ("objectives/objectives.json", "loss.json"):
    if (out / name).is_file():
        report[name.split("/")[-1][:-5]] = json.loads((out / name).read_text())
for name in ("train_step", "output_layer"):
    log = out / f"{name}.log"
    report[f"{name}_table"] = log.read_text()[-4000:] if log.is_file() else ""
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu_check: wrote {out / 'gpu_check.json'}")
PY
! grep -q '"exit": [1-9]' "$OUT/steps.jsonl"
