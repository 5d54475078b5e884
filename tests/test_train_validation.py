"""Bad configurations fail fast, with one clear message, on every rank; defaults follow the paper.

Each bad configuration is started as 2 ranks with torchrun's environment but no launcher (so no rank
is killed because another one failed, and each rank's own verdict shows); every rank must exit with
status 2 and print the message. A rank that went on to initialize torch.distributed would wait for
the other forever: the timeout catches that. One configuration also runs under torchrun itself.
"""

import json
import time

import pytest

from megatron_rift.training.arguments import OBJECTIVES, PREFERENCE_OBJECTIVES, parse_args
from megatron_rift.training.validation import DEFAULT_LR, ConfigError, resolve_plan
from tests.workers.train_runs import (
    prepared_assets,
    start_ranks_without_launcher,
    start_trainer,
    wait_ranks,
    wait_trainer,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepared_assets(tmp_path_factory.getbasetemp())


def _te_and_gpu():
    import torch

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def bad_configurations(assets):
    """(name, extra flags, text every rank must print); flags are added to a valid tiny run."""
    cases = [
        ("world_size", ["--tensor-model-parallel-size", "4"],
         "world size 2 is not divisible by tensor-model-parallel-size 4"),
        ("heads_vs_tp", ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3",
                         "--hidden-size", "48"],
         "num_attention_heads=3 is not divisible by --tensor-model-parallel-size 2"),
        ("vocab_too_small", ["--vocab-size", "32"],
         "smaller than the dataset tokenizer's 64"),
        ("global_batch", ["--global-batch-size", "6", "--micro-batch-size", "2"],
         "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
        ("missing_data", ["--data-path", str(assets["data"]) + "_missing"],
         "pack rollouts with tools/pack_rollouts.py"),
        ("unknown_objective", ["--objective", "ppo"], "invalid choice: 'ppo'"),
        ("dpo_without_pairs", ["--objective", "dpo"], "is a plain rollout dataset"),
        ("missing_load", ["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt does not exist"),
        ("seq_length", ["--seq-length", "8"], "--seq-length 8 is shorter than rollout"),
        ("vocab_padding", ["--load", assets["release_vocab100"], "--tensor-model-parallel-size",
                           "2"],
         "the embedding has 128 rows"),
    ]
    if not _te_and_gpu():
        cases.append(("fp8_without_te", ["--fp8-format", "hybrid", "--bf16"],
                      "--fp8-format needs Transformer Engine"))
    return cases


def test_each_bad_configuration_exits_nonzero_with_its_message_on_every_rank(assets,
                                                                             tmp_path):
    valid = ["--data-path", assets["data"], "--num-layers", "2", "--hidden-size", "64",
             "--num-attention-heads", "4", "--micro-batch-size", "1", "--global-batch-size", "8",
             "--train-iters", "1"]
    cases = bad_configurations(assets)
    launched = [(name, tmp_path / name, start_ranks_without_launcher(tmp_path / name, 2,
                                                                     [*valid, *flags]))
                for name, flags, _ in cases]
    results = {name: wait_ranks(procs, run_dir, timeout=300) for name, run_dir, procs in launched}
    for name, _, message in cases:
        for rank, (code, output) in enumerate(results[name]):
            assert code == 2, f"{name}, rank {rank}: exit {code}\n{output[-3000:]}"
            assert message in output, f"{name}, rank {rank}: no {message!r}:\n{output[-3000:]}"
            assert "Traceback" not in output, f"{name}, rank {rank}: a traceback, not a message"
            if name != "unknown_objective":  # argparse's message carries no rank
                assert f"error (rank {rank})" in output, name
            if name not in ("seq_length", "vocab_padding"):  # checked after the heavy imports
                assert "megatron.core" not in output, name


def test_bad_configuration_under_torchrun_fails_the_launch(assets, tmp_path):
    started = time.monotonic()
    proc = start_trainer(tmp_path, 2, ["--data-path", assets["data"],
                                       "--tensor-model-parallel-size", "4"])
    code, output, _ = wait_trainer(proc, tmp_path, timeout=300)
    assert code != 0
    assert "world size 2 is not divisible by tensor-model-parallel-size 4" in output
    assert time.monotonic() - started < 300


def test_validation_messages_name_the_flag_and_fix_in_process(assets):
    args = parse_args(["--data-path", assets["data"], "--global-batch-size", "10",
                       "--micro-batch-size", "4"])
    with pytest.raises(ConfigError, match="choose a global batch that is a multiple of 4"):
        resolve_plan(args, world_size=1)


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o not in PREFERENCE_OBJECTIVES])
def test_paper_defaults(assets, objective):
    """Section 4.1: AdamW, cosine with 5% warmup, global batch 64, 3 epochs, lr 2e-6 (rift) /
    1e-5 (sft, rft); per-objective lr when --lr is not given."""
    from megatron_rift import losses

    args = parse_args(["--data-path", assets["data"], "--objective", objective,
                       "--global-batch-size", "8"])
    plan = resolve_plan(args, world_size=1)
    assert plan.lr == losses.DEFAULT_LR[objective] == DEFAULT_LR[objective]
    assert {"rift": 2e-6, "sft": 1e-5, "rft": 1e-5}.get(objective, plan.lr) == plan.lr
    assert args.lr_decay_style == "cosine" and args.epochs == 3
    assert parse_args(["--data-path", "x"]).global_batch_size == 64
    assert plan.train_iters == 3 * (48 // 8)  # 48 rollouts in the tiny dataset
    assert plan.warmup_iters == round(0.05 * plan.train_iters)


def test_preference_objectives_count_pairs_or_samples(assets):
    """dpo/simpo draw pairs (2 documents each), kto samples with a non-zero reward; their default
    lr is the paper's DPO rate; online references need a starting model and PP=1."""
    import numpy as np

    pairs = json.loads(open(assets["pairs"] + ".json").read())
    for objective in ("dpo", "simpo"):
        plan = resolve_plan(parse_args(["--data-path", assets["pairs"], "--objective", objective,
                                        "--global-batch-size", "8"]), world_size=1)
        assert plan.num_samples == pairs["num_pairs"] == pairs["rollouts"] // 2
        assert plan.train_iters == 3 * (pairs["num_pairs"] // 8) and plan.lr == 2e-6
    rewards = np.load(assets["data"] + ".rewards.npy")["reward"]
    plan = resolve_plan(parse_args(["--data-path", assets["data"], "--objective", "kto",
                                    "--global-batch-size", "8"]), world_size=1)
    assert plan.num_samples == int((rewards != 0).sum())
    with pytest.raises(ConfigError, match="--pairs ground-truth"):
        resolve_plan(parse_args(["--data-path", assets["data"], "--objective", "dpo"]), 1)
    with pytest.raises(ConfigError, match="--pretrained-checkpoint"):
        resolve_plan(parse_args(["--data-path", assets["pairs"], "--objective", "dpo",
                                 "--reference", "online", "--global-batch-size", "8"]), 1)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 1"):
        resolve_plan(parse_args(["--data-path", assets["pairs"], "--objective", "dpo",
                                 "--reference", "online", "--global-batch-size", "8",
                                 "--pretrained-checkpoint", assets["release"],
                                 "--pipeline-model-parallel-size", "2"]), world_size=2)


def test_objective_and_file_names_agree_with_the_library():
    from megatron_rift import checkpointing, losses
    from megatron_rift.model import config
    from megatron_rift.training import validation

    assert tuple(OBJECTIVES) == tuple(losses.OBJECTIVES)
    assert validation.TRACKER_FILE == checkpointing.TRACKER_FILE
    assert validation.MODEL_CONFIG_FILE == config.MODEL_CONFIG_FILE


def test_cli_dispatches_train(capsys):
    from megatron_rift.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--objective" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_start_points_follow_the_checkpoint_trackers(assets, tmp_path):
    """release -> fine-tune at step 0; a trainer tracker -> resume; nothing -> the pretrained model."""
    import shutil

    release = assets["release"]
    plan = resolve_plan(parse_args(["--data-path", assets["data"], "--load", release,
                                    "--global-batch-size", "8"]), world_size=1)
    assert (plan.start, plan.start_iteration) == ("finetune", "release")
    assert plan.arch_fields["num_query_groups"] == 2  # from the checkpoint's model_config.json

    empty = tmp_path / "run"
    plan = resolve_plan(parse_args(["--data-path", assets["data"], "--load", str(empty),
                                    "--save", str(empty), "--pretrained-checkpoint", release,
                                    "--global-batch-size", "8"]), world_size=1)
    assert (plan.start, plan.start_dir) == ("finetune", release)

    trainer_root = tmp_path / "trained"
    (trainer_root / "iter_0000003").mkdir(parents=True)
    shutil.copy(f"{release}/model_config.json", trainer_root)
    (trainer_root / "latest_checkpointed_iteration.txt").write_text("3")
    plan = resolve_plan(parse_args(["--data-path", assets["data"], "--load", str(trainer_root),
                                    "--pretrained-checkpoint", release,
                                    "--global-batch-size", "8"]), world_size=1)
    assert (plan.start, plan.start_iteration) == ("resume", 3)

    with pytest.raises(ConfigError, match="contradict the checkpoint"):
        resolve_plan(parse_args(["--data-path", assets["data"], "--load", release,
                                 "--num-layers", "3", "--global-batch-size", "8"]), world_size=1)
