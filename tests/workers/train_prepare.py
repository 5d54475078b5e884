"""Prepare the trainer tests' inputs in one process (one Megatron import):

* a tiny packed rollout dataset (``OUT/data/data.*``, built by the real packing pipeline);
* a "converted" checkpoint of a tiny random GPT (``OUT/release_model``: model_config.json, tracker
  ``release``, dist_checkpointing folder), written the way tools/convert_hf_to_megatron.py does,
  so runs at any TP/PP start from identical weights.

Usage: python tests/workers/train_prepare.py OUT  (prints a JSON line with the paths)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.workers.train_data import build_pairs_dataset, build_rollout_dataset

# vocab 512 pads to 512 at TP=1 and TP=2 (make-vocab-size-divisible-by 128).
TINY_ARCH = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=512,
    max_position_embeddings=128,
)


def build_release_checkpoint(root: Path, **overrides) -> None:
    from megatron_rift.checkpointing import model_sharded_state_dict, save_checkpoint
    from megatron_rift.model import GPTArchitecture, build_gpt_model, to_transformer_config
    from megatron_rift.parallel import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=7)
    try:
        arch = GPTArchitecture(**{**TINY_ARCH, **overrides})
        # TE layers where they run (GPU sessions), so the checkpoint matches the trainer's layers.
        model = build_gpt_model(arch, to_transformer_config(arch))
        root.mkdir(parents=True, exist_ok=True)
        arch.save(root)
        save_checkpoint(root, "release", model_sharded_state_dict(model))
    finally:
        destroy_distributed()


def main(out: str) -> None:
    out = Path(out)
    prefix = build_rollout_dataset(out / "data", num_problems=12, rollouts_per_problem=4)
    pairs = build_pairs_dataset(out / "pairs")
    build_release_checkpoint(out / "release_model")
    # Vocabulary 100 pads to 128 rows at TP=1 but 256 at TP=2: a TP this checkpoint cannot load.
    build_release_checkpoint(out / "release_vocab100", vocab_size=100)
    # Four layers: two per pipeline stage, so PP=2 can interleave two virtual stages.
    build_release_checkpoint(out / "release_4layers", num_layers=4)
    print(
        json.dumps(
            {
                "data": prefix,
                "pairs": pairs,
                "release": str(out / "release_model"),
                "release_vocab100": str(out / "release_vocab100"),
                "release_4layers": str(out / "release_4layers"),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
