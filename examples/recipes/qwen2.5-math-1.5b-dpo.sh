#!/usr/bin/env bash
# The paper's DPO baseline on Qwen2.5-Math-1.5B, one 8-GPU node, with the reference log-probs
# computed once (so DPO trains at SFT's memory instead of keeping a second model in memory):
#   convert -> pack pairs -> reference log-probs -> train (DPO) -> export.
#
#   HF_MODEL=/models/Qwen2.5-Math-1.5B ROLLOUTS=rollouts.jsonl bash examples/recipes/qwen2.5-math-1.5b-dpo.sh
#
# ROLLOUTS: the same JSONL as the RIFT recipe, plus each problem's ground-truth "solution" on every
# record. Pairs as in the paper (section 4.1): the rollout is preferred to the ground truth when it
# is correct, the ground truth otherwise. lr 2e-6 (the paper's DPO rate, the trainer's default for
# --objective dpo), beta 0.1, cosine with 5% warmup, 64 pairs per step, 3 epochs.
set -euo pipefail

HF_MODEL="${HF_MODEL:?set HF_MODEL to the Qwen2.5-Math-1.5B HF folder}"
ROLLOUTS="${ROLLOUTS:?set ROLLOUTS to the rollout JSONL file(s) with a solution field}"
WORK="${WORK:-runs/qwen2.5-math-1.5b-dpo}"
GPUS="${GPUS:-8}"
SEQ_LENGTH="${SEQ_LENGTH:-4096}"
mkdir -p "$WORK"

# 1. HF -> Megatron-Core checkpoint (also the frozen reference).
if [ ! -f "$WORK/base/latest_checkpointed_iteration.txt" ]; then
  python tools/convert_hf_to_megatron.py --hf-path "$HF_MODEL" --output "$WORK/base" --verify
fi

# 2. Rollouts + ground truth -> (chosen, rejected) pairs; an overlong member drops its whole pair.
if [ ! -f "$WORK/data/pairs.json" ]; then
  python tools/pack_rollouts.py --input $ROLLOUTS --output-prefix "$WORK/data/pairs" \
      --tokenizer "$HF_MODEL" --chat-template --max-seq-length "$SEQ_LENGTH" --overlong drop \
      --pairs ground-truth
fi

# 3. The reference model's log-probs, once (DPO only: skip KTO's mismatched samples).
if [ ! -f "$WORK/data/pairs.ref_logprobs.json" ]; then
  torchrun --standalone --nproc-per-node "$GPUS" tools/compute_ref_logprobs.py \
      --load "$WORK/base" --data-path "$WORK/data/pairs" --seq-length "$SEQ_LENGTH" \
      --micro-batch-size 8 --bf16 --skip-kl-samples
fi

# 4. DPO: 64 pairs/step = 8 GPUs x 2 micro-batches x 4 pairs (8 sequences per micro-batch).
torchrun --standalone --nproc-per-node "$GPUS" -m megatron_rift.train \
    --pretrained-checkpoint "$WORK/base" --load "$WORK/train" --save "$WORK/train" \
    --data-path "$WORK/data/pairs" --objective dpo --beta 0.1 \
    --global-batch-size 64 --micro-batch-size 4 --seq-length "$SEQ_LENGTH" --epochs 3 \
    --bf16 --use-distributed-optimizer --save-interval 200 \
    --log-file "$WORK/train/metrics.jsonl"

# 5. Megatron -> HF.
python tools/convert_megatron_to_hf.py --megatron-path "$WORK/train" --output "$WORK/hf" \
    --target-dtype bf16 --verify
echo "done: $WORK/hf"
