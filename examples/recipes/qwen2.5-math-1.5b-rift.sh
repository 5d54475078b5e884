#!/usr/bin/env bash
# The paper's Qwen2.5-Math-1.5B RIFT setting, end to end on one 8-GPU node:
#   convert (HF -> Megatron) -> pack rollouts -> train (RIFT) -> export (Megatron -> HF).
#
#   HF_MODEL=/models/Qwen2.5-Math-1.5B ROLLOUTS=rollouts.jsonl bash examples/recipes/qwen2.5-math-1.5b-rift.sh
#
# ROLLOUTS: JSONL with prompt, response and reward/correct per line, K samples per problem, e.g.
# from tools/generate_rollouts.py (see docs/evaluation.md). Training hyper-parameters are the
# paper's (section 4.1), which are also the trainer's defaults for --objective rift: AdamW,
# lr 2e-6, cosine schedule with 5% warmup, global batch 64, 3 epochs. Rewards: +1 for a correct
# rollout, -0.2 for a wrong one (constant scheme).
set -euo pipefail

HF_MODEL="${HF_MODEL:?set HF_MODEL to the Qwen2.5-Math-1.5B HF folder}"
ROLLOUTS="${ROLLOUTS:?set ROLLOUTS to the rollout JSONL file(s)}"
WORK="${WORK:-runs/qwen2.5-math-1.5b-rift}"
GPUS="${GPUS:-8}"
SEQ_LENGTH="${SEQ_LENGTH:-4096}"   # Qwen2.5-Math-1.5B's context; longer rollouts are dropped
mkdir -p "$WORK"

# 1. HF -> Megatron-Core checkpoint (a "release" checkpoint; reshards to any TP/PP at load).
if [ ! -f "$WORK/base/latest_checkpointed_iteration.txt" ]; then
  python tools/convert_hf_to_megatron.py --hf-path "$HF_MODEL" --output "$WORK/base" --verify
fi

# 2. Rollouts -> packed dataset (tokens + per-rollout reward), with the model's own tokenizer
#    and chat template.
if [ ! -f "$WORK/data/rollouts.json" ]; then
  python tools/pack_rollouts.py --input $ROLLOUTS --output-prefix "$WORK/data/rollouts" \
      --tokenizer "$HF_MODEL" --chat-template --max-seq-length "$SEQ_LENGTH" --overlong drop \
      --reward-scheme constant --positive-reward 1.0 --negative-reward -0.2
fi

# 3. RIFT training. DP=8 (1.5B fits one GPU); 64 rollouts/step = 8 GPUs x 2 micro-batches x 4.
#    --load = --save: rerunning this script after a crash continues from the last checkpoint.
torchrun --standalone --nproc-per-node "$GPUS" -m megatron_rift.train \
    --pretrained-checkpoint "$WORK/base" --load "$WORK/train" --save "$WORK/train" \
    --data-path "$WORK/data/rollouts" --objective rift \
    --global-batch-size 64 --micro-batch-size 4 --seq-length "$SEQ_LENGTH" --epochs 3 \
    --bf16 --use-distributed-optimizer --save-interval 200 \
    --log-file "$WORK/train/metrics.jsonl" --tensorboard-dir "$WORK/tensorboard"

# 4. Megatron -> HF (safetensors + config + tokenizer), ready for vLLM / transformers.
python tools/convert_megatron_to_hf.py --megatron-path "$WORK/train" --output "$WORK/hf" \
    --target-dtype bf16 --verify
echo "done: $WORK/hf"
