"""Damaged datasets and a run with no model source end in the preflight: one line naming the file,
exit 2 on every rank, before any process group (data/integrity.py, training/preflight.py).

The damage is done to copies of freshly packed datasets of both format versions (and of a
version-2 dataset with loss spans); the preflight runs in-process for each case, and three cases
run as real processes: two trainer ranks (no launcher, so each rank's own verdict shows) and the
reference log-prob tool.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_rift.data.format import REF_DTYPE, REF_FORMAT
from megatron_rift.data.integrity import dataset_fingerprint
from megatron_rift.training.arguments import parse_train_config
from megatron_rift.training.preflight import ConfigError, preflight
from tests.fault_fixtures import build_datasets, dataset_content
from tests.torchrun_utils import REPO
from tests.workers.train_runs import start_ranks_without_launcher, wait_ranks

pytestmark = pytest.mark.timeout(300)

SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return build_datasets(tmp_path_factory.mktemp("fault_data"))


def copy_dataset(prefix: str, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for path in Path(prefix).parent.glob(Path(prefix).name + ".*"):
        shutil.copy(path, folder / path.name)
    return str(folder / Path(prefix).name)


def run_preflight(prefix: str, *extra: str):
    argv = ["--data-path", prefix, *SHAPE, "--global-batch-size", "2", *extra]
    return preflight(parse_train_config(argv), world_size=1)


def _truncate(path: str, keep: int) -> None:
    Path(path).write_bytes(Path(path).read_bytes()[:keep])


def _flip(path: str, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x10
    Path(path).write_bytes(bytes(data))


def _edit_json(prefix: str, drop_checksums: bool = False, **changes) -> None:
    info = json.loads(Path(prefix + ".json").read_text())
    info.update(changes)
    if drop_checksums:
        info.pop("checksums", None)
    Path(prefix + ".json").write_text(json.dumps(info))


def _side_rows(prefix: str, rows: int) -> None:
    np.save(prefix + ".rewards.npy", np.load(prefix + ".rewards.npy")[:rows])


def _token(prefix: str, value: int) -> None:
    tokens = np.fromfile(prefix + ".bin", dtype=np.int32)
    tokens[3] = value
    tokens.tofile(prefix + ".bin")


# (name, variant, damage(prefix), file named, words of the message)
DAMAGE = [
    ("bin_cut_short", "plain", lambda p: _truncate(p + ".bin", 40), ".bin", "truncated"),
    ("bin_cut_short_v1", "v1", lambda p: _truncate(p + ".bin", 40), ".bin", "truncated"),
    ("bin_byte_flipped", "plain", lambda p: _flip(p + ".bin", 21), ".bin", "crc32"),
    ("idx_header", "plain", lambda p: _flip(p + ".idx", 2), ".idx", "bad or short header"),
    ("idx_dtype", "v1", lambda p: _flip(p + ".idx", 17), ".idx", "token dtype code"),
    ("idx_cut_short", "chat_spans", lambda p: _truncate(p + ".idx", 60), ".idx", "truncated"),
    ("rewards_fewer_rows", "plain", lambda p: _side_rows(p, 5), ".rewards.npy", "5 rows"),
    ("rewards_fewer_rows_v1", "v1", lambda p: _side_rows(p, 5), ".rewards.npy", "5 rows"),
    (
        "rewards_columns",
        "v1",
        lambda p: np.save(p + ".rewards.npy", np.zeros(12, np.float32)),
        ".rewards.npy",
        "dtype float32",
    ),
    (
        "rewards_cut_short",
        "chat_spans",
        lambda p: _truncate(p + ".rewards.npy", -20),
        ".rewards.npy",
        "needs",
    ),
    ("json_edited", "plain", lambda p: _edit_json(p, rollouts=11), ".json", "checksum"),
    (
        "json_count_of_older_dataset",
        "plain",
        lambda p: _edit_json(p, drop_checksums=True, total_tokens=3),
        ".json",
        "total_tokens",
    ),
    ("json_counts_v1", "v1", lambda p: _edit_json(p, rollouts=11), ".json", "rollouts = 11"),
    ("json_not_json", "plain", lambda p: _truncate(p + ".json", 30), ".json", "not valid JSON"),
    ("json_version", "plain", lambda p: _edit_json(p, version=7), ".json", "format version 7"),
    ("token_outside_vocab_v1", "v1", lambda p: _token(p, 10**6), ".bin", "token id 1000000"),
    (
        "spans_flipped",
        "chat_spans",
        lambda p: _flip(p + ".loss_spans.npy", -5),
        ".loss_spans.npy",
        "crc32",
    ),
    (
        "spans_missing",
        "chat_spans",
        lambda p: Path(p + ".loss_spans.npy").unlink(),
        ".loss_spans.npy",
        "missing",
    ),
]


@pytest.mark.parametrize("name, variant, damage, suffix, words", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_dataset_is_one_preflight_error_naming_the_file(
    datasets, tmp_path, name, variant, damage, suffix, words
):
    prefix = copy_dataset(datasets[variant], tmp_path / name)
    run_preflight(prefix)  # the intact copy passes
    damage(prefix)
    with pytest.raises(ConfigError) as caught:
        run_preflight(prefix)
    message = str(caught.value)
    assert prefix + suffix in message and words in message, message


def test_both_format_versions_and_loss_spans_pass_and_read_as_packed(datasets):
    for variant, prefix in datasets.items():
        plan = run_preflight(prefix)
        assert plan.dataset_info["version"] == (1 if variant == "v1" else 2)
    assert dataset_content(datasets["v1"]) == dataset_content(datasets["plain"])


def _reference_files(prefix: str, **changes) -> str:
    """Reference log-probs for ``prefix`` written the way tools/compute_ref_logprobs.py does."""
    rows = np.zeros(12, dtype=REF_DTYPE)
    np.save(prefix + ".ref_logprobs.npy", rows)
    info = {
        "format": REF_FORMAT,
        "kl_samples": True,
        "dataset_fingerprint": dataset_fingerprint(prefix),
    }
    Path(prefix + ".ref_logprobs.json").write_text(json.dumps({**info, **changes}))
    return prefix + ".ref_logprobs"


def test_reference_logprobs_are_checked_against_the_dataset(datasets, tmp_path):
    prefix = copy_dataset(datasets["plain"], tmp_path / "ref")
    kto = ["--objective", "kto", "--reference", "precomputed", "--global-batch-size", "2"]
    with pytest.raises(ConfigError, match=r"ref_logprobs\.npy.*compute_ref_logprobs"):
        run_preflight(prefix, *kto)
    ref = _reference_files(prefix)
    run_preflight(prefix, *kto)
    _truncate(ref + ".npy", 200)
    with pytest.raises(ConfigError, match=rf"{ref}\.npy: .* bytes, its header .*Recompute"):
        run_preflight(prefix, *kto)
    _reference_files(prefix, dataset_fingerprint="0" * 64)
    with pytest.raises(ConfigError, match=rf"{ref}\.json was computed for another dataset"):
        run_preflight(prefix, *kto)
    Path(ref + ".json").write_text("{")
    with pytest.raises(ConfigError, match=rf"{ref}\.json: not valid JSON"):
        run_preflight(prefix, *kto)


def test_a_run_names_its_model_source(datasets, tmp_path):
    """An empty --load with no --pretrained-checkpoint and no shape is an error naming the
    folder; --from-scratch (with the shape) or the shape flags start from random weights."""
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--data-path", datasets["plain"], "--global-batch-size", "2", "--load", str(empty)]
    with pytest.raises(ConfigError, match=rf"--load {empty} holds no checkpoint.*--from-scratch"):
        preflight(parse_train_config(base), world_size=1)
    with pytest.raises(ConfigError, match="--from-scratch needs the new model's shape"):
        preflight(parse_train_config([*base, "--from-scratch"]), world_size=1)
    with pytest.raises(ConfigError, match="--from-scratch and --pretrained-checkpoint contradict"):
        preflight(
            parse_train_config([*base, *SHAPE, "--from-scratch", "--pretrained-checkpoint", "x"]),
            world_size=1,
        )
    for extra in (["--from-scratch", *SHAPE], SHAPE):
        plan = preflight(parse_train_config([*base, *extra]), world_size=1)
        assert plan.start == "scratch" and plan.arch_source == "flags"


def test_every_rank_and_the_reference_tool_exit_2_naming_the_file(datasets, tmp_path):
    prefix = copy_dataset(datasets["plain"], tmp_path / "cut")
    _truncate(prefix + ".bin", 40)
    empty = tmp_path / "empty_load"
    empty.mkdir()
    cases = {
        "bin": (["--data-path", prefix, *SHAPE], f"{prefix}.bin: 40 bytes"),
        "load": (
            ["--data-path", datasets["plain"], "--load", str(empty)],
            f"--load {empty} holds no checkpoint",
        ),
    }
    launched = {
        name: start_ranks_without_launcher(
            tmp_path / name, 2, [*args, "--global-batch-size", "2", "--micro-batch-size", "1"]
        )
        for name, (args, _) in cases.items()
    }
    tool = subprocess.run(
        [sys.executable, str(REPO / "tools/compute_ref_logprobs.py"), "--load", str(empty)]
        + ["--data-path", prefix],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    for name, (_, words) in cases.items():
        for rank, (code, output) in enumerate(wait_ranks(launched[name], tmp_path / name)):
            assert code == 2, f"{name} rank {rank}: exit {code}\n{output[-3000:]}"
            assert words in output and "Traceback" not in output, output[-3000:]
    assert tool.returncode == 2, tool.stderr[-3000:]
    assert f"{prefix}.bin: 40 bytes" in tool.stderr and "Traceback" not in tool.stderr
