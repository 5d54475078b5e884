"""Launch ``python -m megatron_rift.train`` under torchrun from the trainer tests and read its
``metrics.jsonl``. With ``kill_at`` the run goes through ``tests.workers.killing_trainer``
instead, which SIGKILLs global rank 0 at that point (``step:N`` or ``save:N``).

Runs are cached by name under the pytest session's base temp folder, so the parallel and the
resume tests share one uninterrupted reference run. Each launch gets its own process session:
after it ends (or times out) whatever it left behind is killed by that session's id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.torchrun_utils import REPO, free_port

RUN_TIMEOUT = 240  # seconds; a hung collective fails the test instead of hanging CI


def prepared_assets(base: Path) -> dict:
    """The tiny dataset and "converted" release checkpoint (tests/workers/train_prepare.py),
    built once per pytest session."""
    out = base / "train_assets"
    done = out / "assets.json"
    if not done.is_file():
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests/workers/train_prepare.py"), str(out)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=_env(),
            cwd=str(REPO),
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"train_prepare failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )
        done.write_text(proc.stdout.strip().splitlines()[-1])
    return json.loads(done.read_text())


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update(extra or {})
    return env


def start_trainer(
    run_dir: Path,
    nproc: int,
    args: list[str],
    env: dict | None = None,
    kill_at: str | None = None,
    python: str = sys.executable,
) -> subprocess.Popen:
    """Start torchrun in its own session; output goes to run_dir/output.txt. ``kill_at``
    ("step:N" or "save:N") runs tests.workers.killing_trainer, which SIGKILLs rank 0 there."""
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = (
        ["megatron_rift.train"]
        if kill_at is None
        else ["tests.workers.killing_trainer", "--kill-at", kill_at]
    )
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        *entry,
        *args,
    ]
    output = open(run_dir / "output.txt", "w")
    return subprocess.Popen(
        cmd,
        stdout=output,
        stderr=subprocess.STDOUT,
        env=_env(env),
        cwd=str(REPO),
        start_new_session=True,
    )


def start_ranks_without_launcher(
    run_dir: Path, nproc: int, args: list[str], python: str = sys.executable
) -> list:
    """Start ``nproc`` independent trainer processes with torchrun's environment (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT). Unlike torchrun, nothing kills the others when one exits, so
    each rank's own verdict is observable; a rank that wrongly went on to init_process_group would
    wait for the others forever and hit the timeout."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        output = open(run_dir / f"rank{rank}.txt", "w")
        procs.append(
            subprocess.Popen(
                [python, "-m", "megatron_rift.train", *args],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=_env(env),
                cwd=str(REPO),
                start_new_session=True,
            )
        )
    return procs


def wait_ranks(procs: list, run_dir: Path, timeout: float = RUN_TIMEOUT) -> list[tuple[int, str]]:
    """[(exit code, output)] per rank; kills every rank's session afterwards."""
    deadline = time.monotonic() + timeout
    results = []
    for rank, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        results.append((code, (run_dir / f"rank{rank}.txt").read_text()))
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for rank, (code, output) in enumerate(results):
        if code is None:
            raise AssertionError(f"rank {rank} did not exit within {timeout} s:\n{output[-4000:]}")
    return results


def wait_trainer(
    proc: subprocess.Popen, run_dir: Path, timeout: float = RUN_TIMEOUT
) -> tuple[int, str, float]:
    """(exit code, output, seconds); kills the run's whole session on timeout and afterwards."""
    started = time.monotonic()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this run only (its own session)
        except ProcessLookupError:
            pass
    output = (run_dir / "output.txt").read_text()
    if code is None:
        raise AssertionError(f"trainer timed out after {timeout} s:\n{output[-6000:]}")
    return code, output, time.monotonic() - started


def run_trainer(
    run_dir: Path,
    nproc: int,
    args: list[str],
    env: dict | None = None,
    expect_success: bool = True,
    kill_at: str | None = None,
    python: str = sys.executable,
) -> tuple[int, str]:
    code, output, _ = wait_trainer(
        start_trainer(run_dir, nproc, args, env, kill_at, python), run_dir
    )
    if expect_success and code != 0:
        raise AssertionError(f"trainer failed (exit {code}):\n{output[-8000:]}")
    return code, output


def read_metrics(path: Path) -> dict[int, dict]:
    """{step: record} from a metrics.jsonl (a resumed run rewrites later steps: last one wins)."""
    records = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["step"]] = record
    return records


def cached_run(base: Path, name: str, nproc: int, args: list[str]) -> dict[int, dict]:
    """Run once per session under base/train_runs/name; return its metrics."""
    run_dir = base / "train_runs" / name
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "done").is_file():
        if metrics.exists():
            metrics.unlink()
        run_trainer(run_dir, nproc, [*args, "--log-file", str(metrics)])
        (run_dir / "done").write_text("ok")
    return read_metrics(metrics)


def tiny_run_args(
    data: str, checkpoint: str, objective: str = "rift", steps: int | None = None, seed: int = 5
) -> list[str]:
    """The flags every tiny training run shares: ``objective`` on the packed ``data`` from the
    converted ``checkpoint``, rows of 32 tokens, micro-batches of 2, global batch 8, ``steps``
    optimizer steps (None: one epoch). The lr is high for a fine-tune so that each step moves the
    loss visibly."""
    length = ["--epochs", "1"] if steps is None else ["--train-iters", str(steps)]
    return [
        *["--data-path", data, "--pretrained-checkpoint", checkpoint, "--objective", objective],
        *["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", *length],
        *["--lr", "1e-3", "--seed", str(seed)],
    ]


def tiny_rift_args(assets: dict) -> list[str]:
    """One epoch (48 rollouts / 8 = 6 steps) of RIFT from the shared release checkpoint."""
    return tiny_run_args(assets["data"], assets["release"])


def reference_run(base: Path) -> dict[int, dict]:
    """The uninterrupted single-process (TP=PP=DP=1) run every other run is compared with."""
    return cached_run(base, "reference_tp1", 1, tiny_rift_args(prepared_assets(base)))
