"""Names in a checkpoint root (Megatron-LM's layout plus ours), readable without torch.

    CKPT/
      model_config.json                  GPTArchitecture: the model's shape
      tokenizer/, hf_config/             carried from the HF model (converted checkpoints)
      latest_checkpointed_iteration.txt  "release" (a converted model) or the last saved iteration
      release/  or  iter_0000100/        a dist_checkpointing folder

The trainer's preflight reads trackers before torch is imported; :mod:`megatron_rift.checkpointing`
writes them.
"""

from __future__ import annotations

from pathlib import Path

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
MODEL_CONFIG_FILE = "model_config.json"
# The HF model's files a converted root carries (written by the HF -> Megatron converter, read back
# on export); the trainer carries both into its own checkpoint root.
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_DIR = "hf_config"  # the source config.json / generation_config.json, reused on export


def iteration_dir_name(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def read_tracker(ckpt_root: str | Path | None) -> int | str | None:
    """The iteration the tracker points at: an int, ``"release"``, or None when there is none.
    Raises ValueError (naming the file) when the tracker holds anything else."""
    if not ckpt_root:
        return None
    path = Path(ckpt_root) / TRACKER_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{path}: expected an iteration number or 'release', found {text!r}"
        ) from None
