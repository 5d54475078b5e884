"""A tiny Qwen3-MoE release checkpoint for the trainer tests, made the way a user makes one: a random
``Qwen3MoeForCausalLM`` built with transformers, converted by the real converter (fp32, EP=1).

Usage: python tests/workers/moe_train_assets.py OUT VOCAB  (prints the checkpoint root)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def build_moe_release(out: Path, vocab_size: int) -> Path:
    from megatron_rift.convert import convert_hf_to_megatron
    from megatron_rift.parallel import destroy_distributed
    from tests.workers.convert_tiny_models import make_tiny_hf_model

    # 4 experts of 32, top-2, renormalized top-k probabilities (Qwen3-30B-A3B's router), aux-loss
    # coefficient 0.01 from the HF config (the trainer's default).
    hf = make_tiny_hf_model(
        out / "hf",
        "qwen3_moe",
        vocab_size=vocab_size,
        max_position_embeddings=128,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        initializer_range=0.02,
    )
    try:
        convert_hf_to_megatron(hf, out / "release", target_dtype="fp32")
    finally:
        destroy_distributed()
    return out / "release"


if __name__ == "__main__":  # dist_checkpointing.save re-imports the entry script
    print(build_moe_release(Path(sys.argv[1]), int(sys.argv[2])))
