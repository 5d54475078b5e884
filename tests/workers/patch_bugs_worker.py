"""Show, on the installed megatron-core, each bug a patch of ours works around and that the patch
fixes it (tests/test_megatron_versions.py). One process, a gloo world of one.

Usage: python tests/workers/patch_bugs_worker.py DATA_PREFIX CKPT_ROOT  (prints one JSON line)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def rng_state_bug() -> dict:
    """Megatron's _set_cuda_rng_state never restores anything without CUDA; ours does."""
    import torch
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_rift import cpu_compat

    original = mcore_random._set_cuda_rng_state
    assert original is not cpu_compat._set_rng_state_on_cpu, "patched before the check"
    torch.manual_seed(1)
    wanted = torch.get_rng_state()
    torch.manual_seed(2)
    before = torch.get_rng_state()
    original(wanted)
    bug = torch.equal(torch.get_rng_state(), before) and not torch.equal(before, wanted)
    cpu_compat._set_rng_state_on_cpu(wanted)
    fixed = torch.equal(torch.get_rng_state(), wanted)
    return {"bug": bool(bug), "fixed": bool(fixed)}


def _components(data_prefix: str):
    from megatron_rift.data.dataset import RewardDataset
    from megatron_rift.training.arguments import parse_train_config
    from megatron_rift.training.data import TrainingData
    from megatron_rift.training.preflight import preflight
    from megatron_rift.training.setup import setup_training

    config = parse_train_config(
        [
            "--data-path",
            data_prefix,
            "--num-layers",
            "1",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "2",
            "--seq-length",
            "32",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "2",
            "--train-iters",
            "2",
            "--use-distributed-optimizer",
            "--lr",
            "1e-3",
        ]
    )
    plan = preflight(config, 1)
    dataset = RewardDataset(data_prefix)
    data = TrainingData(dataset, None, config.data, config.schedule, 32, 0, 1, use_te=False)
    return setup_training(config, plan), data, plan


def dist_optimizer_bugs(data_prefix: str, root: Path) -> dict:
    """Save a distributed-optimizer checkpoint after one step, then load it into fresh optimizers
    with each fix left out in turn."""
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    from megatron_rift.checkpointing import load_checkpoint, save_checkpoint
    from megatron_rift.objectives import get_objective
    from megatron_rift.training import dist_optimizer_fixes as fixes
    from megatron_rift.training.checkpoint_state import training_state_dict
    from megatron_rift.training.step import loss_settings, make_forward_step, train_step

    init_num_microbatches_calculator(0, None, 2, 2, 1)
    components, data, plan = _components(data_prefix)
    objective = get_objective("rift")
    forward = make_forward_step(
        objective, loss_settings(objective, _default_objective()), False, False
    )
    batches, _ = data.next_step()
    train_step(components, batches, 1, 32, 2, forward)
    folder = save_checkpoint(root, 1, training_state_dict(components, data, 1, {}, False))
    saved_step = [float(s["step"]) for s in components.optimizer.optimizer.state.values()]

    def fresh_template(prepare: bool):
        fresh, fresh_data, _ = _components(data_prefix)
        if prepare:
            fixes.prepare_for_load(fresh.optimizer)
        return fresh, training_state_dict(fresh, fresh_data, 0, {}, True, with_rng=False)

    result = {"needs_fixes": fixes.needs_fixes(components.optimizer)}
    try:  # bug 1: a fresh optimizer cannot build its load template
        fresh_template(prepare=False)
        result["bug1"] = False
    except AssertionError:
        result["bug1"] = True
    fresh, template = fresh_template(prepare=True)
    loaded = load_checkpoint(folder, template)
    try:  # bug 3: the original setter copies "step", which the loaded tensors lack
        fresh.optimizer.load_state_dict(loaded["optimizer"])
        result["bug3"] = False
    except KeyError:
        result["bug3"] = True
    fresh, template = fresh_template(prepare=True)
    loaded = load_checkpoint(folder, template)
    with fixes.patched_state_setter(fresh.optimizer):
        fresh.optimizer.load_state_dict(loaded["optimizer"])
    states = list(fresh.optimizer.optimizer.state.values())
    # bug 2: one step tensor shared by every parameter (AdamW then counts it up per parameter)
    result["bug2"] = len(states) > 1 and len({id(s["step"]) for s in states}) == 1
    fixes.unshare_step_states(fresh.optimizer)
    result["fixed"] = (
        len({id(s["step"]) for s in states}) == len(states)
        and [float(s["step"]) for s in states] == saved_step
    )
    return result


def _default_objective():
    from megatron_rift.training.config import ObjectiveConfig

    return ObjectiveConfig()


def main() -> None:
    # Megatron's model modules run torch.compile decorators at import: import them before the CPU
    # remap exists (as the trainer does).
    import megatron_rift.training.checkpoint_state
    import megatron_rift.training.setup
    import megatron_rift.training.step  # noqa: F401
    from megatron_rift.parallel import destroy_distributed, init_distributed

    data_prefix, root = sys.argv[1], Path(sys.argv[2])
    rng = rng_state_bug()  # before init_distributed installs the patch
    init_distributed(1, 1, seed=3)
    try:
        report = {"rng_state": rng, "dist_optimizer": dist_optimizer_bugs(data_prefix, root)}
    finally:
        destroy_distributed()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
