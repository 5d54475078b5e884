"""Bad configurations fail fast, with one clear message, on every rank; defaults follow the paper.

Each bad configuration is launched under torchrun with 2 processes (all launched at once); every
rank must exit non-zero and print the message, well before any collective could hang.
"""

import time

import pytest

from megatron_rift.training.arguments import OBJECTIVES, parse_args
from megatron_rift.training.validation import DEFAULT_LR, ConfigError, resolve_plan
from tests.torchrun_utils import REPO
from tests.workers.train_runs import prepared_assets, start_trainer, wait_trainer

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
        ("unknown_objective", ["--objective", "dpo"], "invalid choice: 'dpo'"),
        ("missing_load", ["--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt does not exist"),
        ("seq_length", ["--seq-length", "8"], "--seq-length 8 is shorter than rollout"),
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
    started = time.monotonic()
    launched = []
    for name, flags, _ in bad_configurations(assets):
        run_dir = tmp_path / name
        launched.append((name, run_dir, start_trainer(run_dir, 2, [*valid, *flags])))
    results = {name: wait_trainer(proc, run_dir, timeout=300) for name, run_dir, proc in launched}
    total = time.monotonic() - started
    for name, _, message in bad_configurations(assets):
        code, output, seconds = results[name]
        assert code != 0, f"{name}: exit 0\n{output[-3000:]}"
        assert output.count(message) >= 2, f"{name}: expected {message!r} from both ranks:\n" \
                                            f"{output[-3000:]}"
        # torchrun prints its own traceback; the workers must not (a message, not a crash).
        assert f'File "{REPO}/megatron_rift' not in output, f"{name}: worker traceback"
        if name != "unknown_objective":  # argparse's message carries no rank
            assert "error (rank 0)" in output and "error (rank 1)" in output, name
        if name != "seq_length":  # that check needs the dataset index, after the heavy imports
            assert "megatron.core" not in output, name
    # All nine launched together on 2 shared cores; none trained or hung.
    assert total < 300


def test_validation_messages_name_the_flag_and_fix_in_process(assets):
    args = parse_args(["--data-path", assets["data"], "--global-batch-size", "10",
                       "--micro-batch-size", "4"])
    with pytest.raises(ConfigError, match="choose a global batch that is a multiple of 4"):
        resolve_plan(args, world_size=1)


@pytest.mark.parametrize("objective", OBJECTIVES)
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
