"""Launch a script under ``torchrun`` from a test and collect what each rank reported.

Worker scripts write JSON results to ``$RESULT_DIR/rank{RANK}.json`` (see :func:`write_rank_result`).
Every launch has a timeout, so a hung collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script: str | Path,
    args: list[str] | None = None,
    nproc: int = 2,
    timeout: float = 300,
    result_dir: str | Path | None = None,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node=nproc script args``; raise with the output on failure."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *(args or []),
    ]
    full_env = dict(os.environ)
    full_env.update(
        {
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + full_env.get("PYTHONPATH", ""),
        }
    )
    if result_dir is not None:
        full_env["RESULT_DIR"] = str(result_dir)
    full_env.update(env or {})
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO)
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed (exit {proc.returncode}):\n"
            f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def write_rank_result(obj) -> None:
    """Called inside a worker: dump ``obj`` as JSON for this rank."""
    out = Path(os.environ["RESULT_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(obj))


def read_rank_results(result_dir: str | Path, nproc: int) -> list:
    return [json.loads((Path(result_dir) / f"rank{r}.json").read_text()) for r in range(nproc)]


def world_size_from_env_or_1() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
