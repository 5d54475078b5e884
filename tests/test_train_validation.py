"""Bad configurations fail fast, with one clear message, on every rank; defaults follow the paper.

Each bad configuration is started as 2 ranks with torchrun's environment but no launcher (so no rank
is killed because another one failed, and each rank's own verdict shows); every rank must exit with
status 2 and print the message. A rank that went on to initialize torch.distributed would wait for
the other forever: the timeout catches that. One configuration also runs under torchrun itself.
"""

import json
import time

import pytest

from megatron_rift.objectives import Unit, get_objective, objectives
from megatron_rift.training.arguments import config_to_argv, parse_train_config
from megatron_rift.training.config import TrainConfig, load_config, save_config
from megatron_rift.training.preflight import ConfigError, preflight
from tests.workers.train_runs import (
    prepared_assets,
    start_ranks_without_launcher,
    start_trainer,
    wait_ranks,
    wait_trainer,
)

TINY_SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
TOKEN_OBJECTIVES = [o.name for o in objectives() if o.unit is Unit.ROLLOUT]


def parse_args(argv):
    return parse_train_config(argv)


def resolve_plan(config, world_size):
    return preflight(config, world_size)


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
        (
            "world_size",
            ["--tensor-model-parallel-size", "4"],
            "world size 2 is not divisible by tensor-model-parallel-size 4",
        ),
        (
            "heads_vs_tp",
            [
                "--tensor-model-parallel-size",
                "2",
                "--num-attention-heads",
                "3",
                "--hidden-size",
                "48",
            ],
            "num_attention_heads=3 is not divisible by --tensor-model-parallel-size 2",
        ),
        ("vocab_too_small", ["--vocab-size", "32"], "smaller than the dataset tokenizer's 64"),
        (
            "global_batch",
            ["--global-batch-size", "6", "--micro-batch-size", "2"],
            "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2",
        ),
        (
            "missing_data",
            ["--data-path", str(assets["data"]) + "_missing"],
            "pack rollouts with tools/pack_rollouts.py",
        ),
        ("unknown_objective", ["--objective", "ppo"], "invalid choice: 'ppo'"),
        ("dpo_without_pairs", ["--objective", "dpo"], "is a plain rollout dataset"),
        (
            "missing_load",
            ["--load", "/nonexistent/ckpt"],
            "--load /nonexistent/ckpt does not exist",
        ),
        ("plugin_missing", ["--plugin", "no_such_module_xyz"], "--plugin: No module named"),
        ("seq_length", ["--seq-length", "8"], "--seq-length 8 is shorter than rollout"),
        (
            "fusion_chunk_without_fusion",
            ["--cross-entropy-fusion-chunk-size", "64"],
            "has no effect without --cross-entropy-loss-fusion",
        ),
        (
            "vocab_padding",
            ["--load", assets["release_vocab100"], "--tensor-model-parallel-size", "2"],
            "the embedding has 128 rows",
        ),
    ]
    if not _te_and_gpu():
        cases.append(
            (
                "fp8_without_te",
                ["--fp8-format", "hybrid", "--bf16"],
                "--fp8-format needs Transformer Engine",
            )
        )
    return cases


def test_each_bad_configuration_exits_nonzero_with_its_message_on_every_rank(assets, tmp_path):
    valid = [
        "--data-path",
        assets["data"],
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "8",
        "--train-iters",
        "1",
    ]
    cases = bad_configurations(assets)
    launched = [
        (name, tmp_path / name, start_ranks_without_launcher(tmp_path / name, 2, [*valid, *flags]))
        for name, flags, _ in cases
    ]
    results = {name: wait_ranks(procs, run_dir, timeout=300) for name, run_dir, procs in launched}
    for name, _, message in cases:
        for rank, (code, output) in enumerate(results[name]):
            assert code == 2, f"{name}, rank {rank}: exit {code}\n{output[-3000:]}"
            assert message in output, f"{name}, rank {rank}: no {message!r}:\n{output[-3000:]}"
            assert "Traceback" not in output, f"{name}, rank {rank}: a traceback, not a message"
            if name not in ("unknown_objective", "plugin_missing"):  # argparse's: no rank
                assert f"error (rank {rank})" in output, name
            if name not in ("seq_length", "vocab_padding"):  # checked after the heavy imports
                assert "megatron.core" not in output, name


def test_bad_configuration_under_torchrun_fails_the_launch(assets, tmp_path):
    started = time.monotonic()
    proc = start_trainer(
        tmp_path, 2, ["--data-path", assets["data"], "--tensor-model-parallel-size", "4"]
    )
    code, output, _ = wait_trainer(proc, tmp_path, timeout=300)
    assert code != 0
    assert "world size 2 is not divisible by tensor-model-parallel-size 4" in output
    assert time.monotonic() - started < 300


def test_validation_messages_name_the_flag_and_fix_in_process(assets):
    args = parse_args(
        [
            "--data-path",
            assets["data"],
            "--global-batch-size",
            "10",
            "--micro-batch-size",
            "4",
            *TINY_SHAPE,
        ]
    )
    with pytest.raises(ConfigError, match="choose a global batch that is a multiple of 4"):
        resolve_plan(args, world_size=1)


@pytest.mark.parametrize("objective", TOKEN_OBJECTIVES)
def test_paper_defaults(assets, objective):
    """Section 4.1: AdamW, cosine with 5% warmup, global batch 64, 3 epochs, lr 2e-6 (rift) /
    1e-5 (sft, rft); per-objective lr when --lr is not given."""
    args = parse_args(
        [
            "--data-path",
            assets["data"],
            "--objective",
            objective,
            "--global-batch-size",
            "8",
            *TINY_SHAPE,
        ]
    )
    plan = resolve_plan(args, world_size=1)
    assert plan.lr == get_objective(objective).default_lr
    assert {"rift": 2e-6, "sft": 1e-5, "rft": 1e-5}.get(objective, plan.lr) == plan.lr
    assert args.optimizer.lr_decay_style == "cosine" and args.schedule.epochs == 3
    assert parse_args(["--data-path", "x"]).schedule.global_batch_size == 64
    assert plan.train_iters == 3 * (48 // 8)  # 48 rollouts in the tiny dataset
    assert plan.warmup_iters == round(0.05 * plan.train_iters)


def test_preference_objectives_count_pairs_or_samples(assets):
    """dpo/simpo draw pairs (2 documents each), kto samples with a non-zero reward; their default
    lr is the paper's DPO rate; online references need a starting model and PP=1."""
    import numpy as np

    pairs = json.loads(open(assets["pairs"] + ".json").read())
    # The preflight checks precomputed reference log-probs too; these datasets have none.
    ONLINE_REFERENCE = ["--reference", "online", "--pretrained-checkpoint", assets["release"]]
    for objective in ("dpo", "simpo"):
        plan = resolve_plan(
            parse_args(
                [
                    "--data-path",
                    assets["pairs"],
                    "--objective",
                    objective,
                    "--global-batch-size",
                    "8",
                    *TINY_SHAPE,
                    *ONLINE_REFERENCE,
                ]
            ),
            world_size=1,
        )
        assert plan.num_samples == pairs["num_pairs"] == pairs["rollouts"] // 2
        assert plan.train_iters == 3 * (pairs["num_pairs"] // 8) and plan.lr == 2e-6
    rewards = np.load(assets["data"] + ".rewards.npy")["reward"]
    plan = resolve_plan(
        parse_args(
            [
                "--data-path",
                assets["data"],
                "--objective",
                "kto",
                "--global-batch-size",
                "8",
                *TINY_SHAPE,
                *ONLINE_REFERENCE,
            ]
        ),
        world_size=1,
    )
    assert plan.num_samples == int((rewards != 0).sum())
    with pytest.raises(ConfigError, match="--pairs ground-truth"):
        resolve_plan(
            parse_args(["--data-path", assets["data"], "--objective", "dpo", *TINY_SHAPE]), 1
        )
    with pytest.raises(ConfigError, match="--pretrained-checkpoint"):
        resolve_plan(
            parse_args(
                [
                    "--data-path",
                    assets["pairs"],
                    "--objective",
                    "dpo",
                    "--reference",
                    "online",
                    "--global-batch-size",
                    "8",
                ]
            ),
            1,
        )
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 1"):
        resolve_plan(
            parse_args(
                [
                    "--data-path",
                    assets["pairs"],
                    "--objective",
                    "dpo",
                    "--reference",
                    "online",
                    "--global-batch-size",
                    "8",
                    "--pretrained-checkpoint",
                    assets["release"],
                    "--pipeline-model-parallel-size",
                    "2",
                ]
            ),
            world_size=2,
        )


def test_a_run_must_name_where_its_weights_come_from(assets, tmp_path):
    """An empty --load (a typo'd path in a job script) with no --pretrained-checkpoint and no
    model shape used to train a 2-layer default from random weights; now it is an error."""
    empty = tmp_path / "empty"
    empty.mkdir()
    args = parse_args(
        ["--data-path", assets["data"], "--load", str(empty), "--global-batch-size", "8"]
    )
    with pytest.raises(
        ConfigError,
        match="no model to start from.*--num-layers, --hidden-size, --num-attention-heads",
    ):
        resolve_plan(args, world_size=1)
    plan = resolve_plan(parse_args([*config_to_argv(args), *TINY_SHAPE]), world_size=1)
    assert plan.start == "scratch" and plan.arch_source == "flags"


def test_typed_config_round_trips_through_flags_and_files(assets, tmp_path):
    """The parser is generated from the config dataclasses: flags -> TrainConfig -> flags and
    -> JSON -> TrainConfig give the same configuration; flags override a --config file."""
    argv = [
        "--data-path",
        assets["data"],
        "--objective",
        "dpo",
        "--beta",
        "0.3",
        "--no-shuffle",
        "--bf16",
        "--no-load-optim",
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        "--lr",
        "3e-5",
        "--tensor-model-parallel-size",
        "2",
        "--log-file",
        "m.jsonl",
    ]
    config = parse_args(argv)
    assert (config.objective.name, config.objective.beta, config.data.shuffle) == (
        "dpo",
        0.3,
        False,
    )
    assert config.precision.bf16 and not config.checkpoint.load_optim
    assert config.architecture.given() == {"swiglu": True, "tie_word_embeddings": False}
    assert parse_args(config_to_argv(config)) == config
    path = save_config(config, tmp_path / "run.json")
    assert load_config(path) == config
    overridden = parse_args(["--config", str(path), "--lr", "1e-4"])
    assert overridden.optimizer.lr == 1e-4 and overridden.objective.beta == 0.3
    assert TrainConfig.from_dict(config.to_dict()) == config
    bad = tmp_path / "bad.json"
    bad.write_text('{"optimizer": {"learning_rate": 1}}')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])


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
    plan = resolve_plan(
        parse_args(["--data-path", assets["data"], "--load", release, "--global-batch-size", "8"]),
        world_size=1,
    )
    assert (plan.start, plan.start_iteration) == ("finetune", "release")
    assert plan.arch_fields["num_query_groups"] == 2  # from the checkpoint's model_config.json

    empty = tmp_path / "run"
    plan = resolve_plan(
        parse_args(
            [
                "--data-path",
                assets["data"],
                "--load",
                str(empty),
                "--save",
                str(empty),
                "--pretrained-checkpoint",
                release,
                "--global-batch-size",
                "8",
            ]
        ),
        world_size=1,
    )
    assert (plan.start, plan.start_dir) == ("finetune", release)

    trainer_root = tmp_path / "trained"
    (trainer_root / "iter_0000003").mkdir(parents=True)
    shutil.copy(f"{release}/model_config.json", trainer_root)
    (trainer_root / "latest_checkpointed_iteration.txt").write_text("3")
    plan = resolve_plan(
        parse_args(
            [
                "--data-path",
                assets["data"],
                "--load",
                str(trainer_root),
                "--pretrained-checkpoint",
                release,
                "--global-batch-size",
                "8",
            ]
        ),
        world_size=1,
    )
    assert (plan.start, plan.start_iteration) == ("resume", 3)

    with pytest.raises(ConfigError, match="contradict the checkpoint"):
        resolve_plan(
            parse_args(
                [
                    "--data-path",
                    assets["data"],
                    "--load",
                    release,
                    "--num-layers",
                    "3",
                    "--global-batch-size",
                    "8",
                ]
            ),
            world_size=1,
        )
