"""Faults during training end cleanly on every rank, and the last good checkpoint resumes exactly.

Every run here is two TP ranks started with torchrun's environment but no launcher (so each
rank's own exit code and message show, and nothing kills a rank for another's failure), through
``tests.workers.fault_trainer``, which injects the fault from outside the production code:

1. a full disk while checkpoint 4 is written (``OSError(ENOSPC)`` in the last rank's writer):
   every rank exits 1 saying so, the partial save is gone, the tracker still names 2;
2. then a checkpoint 4 cut short by a copy: the preflight names the file, and
   ``--load-fallback previous`` resumes from 2 (the one the full disk left) and says so; its
   next steps have the same losses; with ``--skip-nan-steps 1`` a NaN at step 5 is skipped and
   logged, a NaN at step 6 ends every rank with exit 1 before anything of it is saved;
3. rank 1 SIGKILLed inside step 2, with ``--distributed-timeout-minutes 0.1``: rank 0 names it
   and exits 1 (gloo sees the closed connection at once; the timeout bounds a hung peer).

Damaged checkpoints (a missing shard or common state, a tracker naming a missing iteration, a
model_config.json that disagrees with the weights) are checked in-process.

"Same next-step loss": a resumed step's loss equals, bitwise, the loss the first run logged for
that step (same layout, same data order, restored RNG and optimizer state).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rift.checkpoint_layout import TRACKER_FILE
from megatron_rift.training.arguments import parse_train_config
from megatron_rift.training.preflight import ConfigError, preflight
from tests.torchrun_utils import REPO, free_port
from tests.workers.train_runs import _env, prepared_assets, read_metrics, tiny_rift_args

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

RANK_TIMEOUT = 180  # seconds; a rank that hangs fails the test


def start_fault_ranks(run_dir: Path, faults: list[str], args: list[str]) -> list:
    """Two ranks of tests.workers.fault_trainer, each in its own session, output per rank."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port, procs = str(free_port()), []
    fault_args = [arg for fault in faults for arg in ("--fault", fault)]
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.workers.fault_trainer", *fault_args, *args],
                stdout=open(run_dir / f"rank{rank}.txt", "w"),
                stderr=subprocess.STDOUT,
                env=_env(env),
                cwd=str(REPO),
                start_new_session=True,
            )
        )
    return procs


def wait_fault_ranks(procs: list, run_dir: Path) -> list[tuple[int, str, float]]:
    """[(exit code, output, seconds)] per rank; kills what is left of each rank's session."""
    started, results = time.monotonic(), []
    for rank, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=max(1.0, RANK_TIMEOUT - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            code = None
        results.append(
            (code, (run_dir / f"rank{rank}.txt").read_text(), time.monotonic() - started)
        )
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for rank, (code, output, _) in enumerate(results):
        assert code is not None, f"rank {rank} hung:\n{output[-4000:]}"
    return results


def run_faults(run_dir: Path, faults: list[str], args: list[str]):
    return wait_fault_ranks(start_fault_ranks(run_dir, faults, args), run_dir)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepared_assets(tmp_path_factory.getbasetemp())


def _tracker(ckpt: Path) -> str:
    return (ckpt / TRACKER_FILE).read_text().strip()


def _assert_every_rank(results, code: int, *words: str) -> None:
    for rank, (exit_code, output, _) in enumerate(results):
        assert exit_code == code, f"rank {rank}: exit {exit_code}\n{output[-4000:]}"
        for text in words:
            assert text in output, f"rank {rank} does not say {text!r}:\n{output[-4000:]}"
        assert "Traceback" not in output, output[-4000:]


def test_full_disk_then_damaged_checkpoint_then_nan_steps(assets, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    args = [
        *tiny_rift_args(assets),
        *("--tensor-model-parallel-size", "2", "--load", str(ckpt), "--save", str(ckpt)),
        *("--save-interval", "2", "--log-file", str(metrics)),
    ]
    # 1. ENOSPC in the writer of rank 1 during save 4.
    full = run_faults(tmp_path / "full", ["enospc-at-save:4"], args)
    _assert_every_rank(full, 1, "no space left on device", f"{ckpt}/.tmp_iter_0000004/")
    first = read_metrics(metrics)
    assert sorted(first) == [1, 2, 3, 4]
    assert _tracker(ckpt) == "2" and not (ckpt / "iter_0000004").exists()
    assert not any(p.name.startswith(".tmp_") for p in ckpt.iterdir())  # partial save removed

    # 2. A checkpoint 4 that a copy cut short (tracker 4, a truncated shard): the preflight
    # names the file; --load-fallback previous takes checkpoint 2, the one the full disk left.
    shutil.copytree(ckpt / "iter_0000002", ckpt / "iter_0000004")
    (ckpt / TRACKER_FILE).write_text("4")
    shard = sorted((ckpt / "iter_0000004").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    truncated = rf"{shard} is 100 bytes, the save wrote \d+ \(truncated\)"
    with pytest.raises(ConfigError, match=truncated + ".*--load-fallback previous"):
        preflight(parse_train_config(args), world_size=2)
    fallback = [*args, "--load-fallback", "previous", "--skip-nan-steps", "1"]
    plan = preflight(parse_train_config(fallback), world_size=2)
    assert plan.start_iteration == 2 and "--load-fallback previous" in plan.start_note

    # 3. Resumed from 2 with the same next-step losses; NaN at step 5 is skipped (1 allowed),
    # NaN at step 6 (the last, whose state would be saved) stops every rank, nothing saved.
    nan = run_faults(tmp_path / "nan", ["nan-at-step:5", "nan-at-step:6"], fallback)
    _assert_every_rank(nan, 1, "step 6: NaN/Inf in the loss on rank(s) [0, 1]", "loss=nan")
    output = nan[0][1]
    assert "resuming from the previous complete one, iter_0000002" in output
    assert f"resumed from {ckpt}/iter_0000002 at step 2" in output
    assert "skipped step 5: NaN/Inf in the loss" in output and "1 of --skip-nan-steps 1" in output
    resumed = read_metrics(metrics)
    for step in (3, 4):
        assert resumed[step]["loss"] == first[step]["loss"], step
        assert resumed[step]["grad_norm"] == first[step]["grad_norm"], step
    assert resumed[5]["skipped"] is True and sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert _tracker(ckpt) == "4" and not (ckpt / "iter_0000006").exists()
    assert f"the last checkpoint is {ckpt}/iter_0000004" in output


def _copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_damaged_checkpoints_are_named_before_loading(assets, tmp_path):
    """Missing/truncated shard, missing common state, a tracker naming a missing iteration, a
    model_config.json that disagrees with the weights: one message naming the file."""
    release = Path(assets["release"])
    base = ["--data-path", assets["data"], "--global-batch-size", "8"]

    def verdict(root: Path) -> str:
        with pytest.raises(ConfigError) as caught:
            preflight(parse_train_config([*base, "--load", str(root)]), world_size=1)
        return str(caught.value)

    root = _copy_checkpoint(release, tmp_path / "missing_shard")
    (root / "release" / "__0_1.distcp").unlink()
    assert f"{root}/release/__0_1.distcp is missing" in verdict(root)
    root = _copy_checkpoint(release, tmp_path / "common")
    (root / "release" / "common.pt").unlink()
    assert f"{root}/release/common.pt is missing" in verdict(root)
    root = _copy_checkpoint(release, tmp_path / "tracker")
    (root / TRACKER_FILE).write_text("7")
    message = verdict(root)
    assert f"{root}/iter_0000007 does not exist" in message and TRACKER_FILE in message

    from megatron_rift.model import GPTArchitecture
    from megatron_rift.training.checkpoint_state import check_weights_match_config

    root = _copy_checkpoint(release, tmp_path / "config")
    config = json.loads((root / "model_config.json").read_text())
    config["num_layers"] = 3
    (root / "model_config.json").write_text(json.dumps(config))
    plan = preflight(parse_train_config([*base, "--load", str(root)]), world_size=1)
    with pytest.raises(
        ConfigError, match=rf"{root}/model_config.json does not describe the weights"
    ):
        check_weights_match_config(plan, GPTArchitecture(**plan.arch_fields), plan.arch_source)


def test_a_killed_rank_is_named_and_the_survivor_exits(assets, tmp_path):
    args = [
        *tiny_rift_args(assets),
        *("--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", "0.1"),
    ]
    results = run_faults(tmp_path / "dead", ["kill-rank:1@step:2"], args)
    assert results[1][0] == -signal.SIGKILL, results[1][1][-3000:]
    code, output, seconds = results[0]
    assert code == 1, output[-4000:]
    assert "rank 0 lost contact with rank(s) 1" in output and "during step 2" in output, output
    assert seconds < 90, seconds
