"""The Megatron-Core version matrix: every patch of Megatron internals is checked against the
installed version (and shown to be needed), an unchecked version fails at startup with the patch
named, and checkpoints cross versions forward only: a newer megatron-core resumes an older one's
checkpoint bitwise, an older one refuses a newer one's with one line on every rank.

The cross-version tests run in the leg with the newer megatron-core and drive the other leg's
environment (``.venv`` for Python 3.11 / 0.16.1, ``.venv-py312`` for 3.12 / 0.19.2, both made by
scripts/setup_venv.sh); they skip with the reason when it is not there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_rift import megatron_compat
from megatron_rift.checkpoint_layout import WRITER_FILE
from megatron_rift.megatron_compat import MEGATRON_CORE, TESTED, UnsupportedMegatronCore
from tests.torchrun_utils import REPO
from tests.workers.train_runs import (
    prepared_assets,
    read_metrics,
    run_trainer,
    start_ranks_without_launcher,
    tiny_rift_args,
    wait_ranks,
)

pytestmark = pytest.mark.timeout(900)
VENVS = (".venv", ".venv-py312")


def _patches():
    from megatron_rift import cpu_compat
    from megatron_rift.training import dist_optimizer_fixes

    return [
        cpu_compat.RNG_STATE_PATCH,
        cpu_compat.MOE_ROUTER_GEMM_PATCH,
        cpu_compat.MOE_SPLITS_TO_NUMPY_PATCH,
        dist_optimizer_fixes.STATE_SETTER_PATCH,
    ]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepared_assets(tmp_path_factory.getbasetemp())


def _other_leg() -> tuple[str, Version] | None:
    """(python, megatron-core version) of the other environment, if it exists."""
    here = Path(sys.prefix).resolve()
    for name in VENVS:
        python = REPO / name / "bin" / "python"
        if python.is_file() and (REPO / name).resolve() != here:
            out = subprocess.run(
                [
                    str(python),
                    "-c",
                    "import importlib.metadata as m; print(m.version('megatron-core'))",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode == 0:
                return str(python), Version(out.stdout.strip())
    return None


def _older_leg() -> tuple[str, Version]:
    other = _other_leg()
    if other is None:
        pytest.skip(
            "the other leg's environment is not set up (bash scripts/setup_venv.sh [--python 3.12])"
        )
    if other[1] >= MEGATRON_CORE:
        pytest.skip(f"runs in the leg with the newer megatron-core ({other[1]} here is older)")
    return other


def test_the_declared_range_is_the_tested_matrix():
    assert megatron_compat.SUPPORTED == SpecifierSet(f">={TESTED[0]},<={TESTED[-1]}")
    assert str(MEGATRON_CORE) in TESTED
    script = (REPO / "scripts" / "setup_venv.sh").read_text()
    assert all(version in script for version in TESTED)
    for patch in _patches():
        assert SpecifierSet(patch.versions) == megatron_compat.SUPPORTED, patch.name


def test_every_patch_target_has_the_shape_it_expects_here():
    for patch in _patches():
        assert patch.verify() is patch.resolve(), patch.name


def test_each_patched_bug_is_there_and_the_patch_fixes_it(assets, tmp_path):
    """On this leg's megatron-core: the CPU RNG restore does nothing without the patch, and a
    distributed-optimizer load with torch's AdamW fails twice and shares one step tensor."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests/workers/patch_bugs_worker.py"),
            assets["data"],
            str(tmp_path / "ckpt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rng_state"] == {"bug": True, "fixed": True}, (MEGATRON_CORE, report)
    assert report["dist_optimizer"] == {
        "needs_fixes": True,
        "bug1": True,
        "bug3": True,
        "bug2": True,
        "fixed": True,
    }, (MEGATRON_CORE, report)


def test_an_unchecked_version_or_a_moved_target_names_the_patch(monkeypatch):
    patch = _patches()[0]
    with pytest.raises(UnsupportedMegatronCore, match=r"restore the CPU generator.*not 0\.15\.0"):
        patch.verify(Version("0.15.0"))
    from megatron.core.tensor_parallel import random as mcore_random

    monkeypatch.setattr(mcore_random, "_set_cuda_rng_state", lambda state: None)
    with pytest.raises(UnsupportedMegatronCore, match=r"changed its signature to \('state',\)"):
        patch.verify()
    monkeypatch.delattr(mcore_random, "_set_cuda_rng_state")
    with pytest.raises(
        UnsupportedMegatronCore, match=rf"megatron-core {MEGATRON_CORE} has no such"
    ):
        patch.verify()


@pytest.mark.parametrize(
    "fault, message",
    [
        (
            "megatron_compat.MEGATRON_CORE = Version('0.20.0')",
            "megatron-core 0.20.0 is not supported: megatron-rift is tested with 0.16.1 and 0.19.2",
        ),
        (
            "import megatron.core.tensor_parallel.random as r; del r._set_cuda_rng_state",
            "patch 'restore the CPU generator in the CUDA RNG tracker'",
        ),
    ],
)
def test_startup_fails_with_the_version_and_the_patch_named(assets, tmp_path, fault, message):
    """The trainer itself, with a faked version or a removed target: exit 2 and one line."""
    code = (
        "import sys\nfrom packaging.version import Version\n"
        "from megatron_rift import megatron_compat\n"
        f"{fault}\n"
        "from megatron_rift.train import main\n"
        f"sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [*tiny_rift_args(assets), "--train-iters", "1"]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO),
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_every_checkpoint_records_the_versions_that_wrote_it(assets):
    record = json.loads((Path(assets["release"]) / "release" / WRITER_FILE).read_text())
    assert record["megatron_core"] == str(MEGATRON_CORE)
    assert record["torch"] and record["megatron_rift"]


def test_an_older_checkpoint_resumes_bitwise_under_this_newer_core(tmp_path):
    """Assets and steps 1-4 under the older megatron-core, with a save at step 2; steps 3-4 again
    here from that save: the same losses and gradient norms, bit for bit."""
    older, _ = _older_leg()
    out = subprocess.run(
        [older, str(REPO / "tests/workers/train_prepare.py"), str(tmp_path / "assets")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    older_assets = json.loads(out.stdout.strip().splitlines()[-1])
    root = tmp_path / "older_ckpt"
    args = [*tiny_rift_args(older_assets), "--train-iters", "4"]
    run_trainer(
        tmp_path / "older",
        1,
        [
            *args,
            "--save",
            str(root),
            "--save-interval",
            "2",
            "--log-file",
            str(tmp_path / "older.jsonl"),
        ],
        python=older,
    )
    resumed_root = tmp_path / "resumed_ckpt"
    shutil.copytree(root, resumed_root)
    run_trainer(
        tmp_path / "newer",
        1,
        [
            *args,
            "--load",
            str(resumed_root),
            "--ckpt-step",
            "2",
            "--save",
            str(resumed_root),
            "--log-file",
            str(tmp_path / "newer.jsonl"),
        ],
    )
    before, after = read_metrics(tmp_path / "older.jsonl"), read_metrics(tmp_path / "newer.jsonl")
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step]["loss"] == before[step]["loss"], (step, before[step], after[step])
        assert after[step]["grad_norm"] == before[step]["grad_norm"], step


def test_a_newer_checkpoint_under_the_older_core_ends_with_one_line_on_every_rank(assets, tmp_path):
    """A trainer checkpoint (--load) and a converted model (--pretrained-checkpoint) written here
    are refused by the older megatron-core: exit 2, the one line, no traceback, on each rank."""
    older, older_version = _older_leg()
    ckpt = tmp_path / "newer_ckpt"
    run_trainer(
        tmp_path / "write", 1, [*tiny_rift_args(assets), "--train-iters", "1", "--save", str(ckpt)]
    )
    base = [
        "--data-path",
        assets["data"],
        "--seq-length",
        "32",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--train-iters",
        "1",
    ]
    for name, start in (
        ("load", ["--load", str(ckpt)]),
        ("pretrained", ["--pretrained-checkpoint", assets["release"]]),
    ):
        procs = start_ranks_without_launcher(tmp_path / name, 2, [*base, *start], python=older)
        for rank, (code, output) in enumerate(wait_ranks(procs, tmp_path / name, timeout=300)):
            assert code == 2, (name, rank, output[-3000:])
            assert f"error (rank {rank})" in output and "Traceback" not in output, output[-3000:]
            assert f"was written by megatron-core {MEGATRON_CORE}" in output, output[-3000:]
            assert f"megatron-core {older_version} cannot read" in output, output[-3000:]


def test_the_dockerfile_install_resolves_against_its_base_images_torch():
    """Without Docker: the pinned image's torch satisfies every torch requirement of the pinned
    megatron-core and of megatron-rift; NGC 25.01's pre-release 2.6.0a0 would not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_docker_resolution", REPO / "scripts" / "check_docker_resolution.py"
    )
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    pins = check.dockerfile_args(REPO / "Dockerfile")
    if pins["MEGATRON_CORE_VERSION"] != str(MEGATRON_CORE):
        pytest.skip(
            f"the Dockerfile pins megatron-core {pins['MEGATRON_CORE_VERSION']}; this leg "
            f"has {MEGATRON_CORE} (the check runs in that leg, reading installed metadata)"
        )
    assert pins["MEGATRON_CORE_VERSION"] in TESTED
    requirements = check.megatron_core_requirements(str(MEGATRON_CORE))
    requirements += check.project_requirements()
    assert any(_requirement_name(r) == "torch" for r in requirements)
    assert check.torch_problems(pins["BASE_IMAGE_TORCH"], requirements) == []
    assert check.main([]) == 0
    assert any(
        "torch>=2.6.0" in p
        for p in check.torch_problems("2.6.0a0+ecf3bae40a.nv25.01", requirements)
    )


def _requirement_name(line: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(line).name
