"""The converters under torchrun (gloo, 2 processes): TP=2 and PP=2 conversion with --verify,
checkpoints reshard across TP/PP, and the CLI's exit status on bad input."""

import subprocess
import sys

import pytest
from megatron.core import dist_checkpointing

from megatron_rift.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_rift.parallel import destroy_distributed
from tests.torchrun_utils import REPO, read_rank_results, run_torchrun
from tests.workers.convert_tiny_models import VOCAB, make_tiny_hf_model, safetensors_weights

WORKER = REPO / "tests" / "workers" / "convert_parallel_worker.py"


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_tp2_and_pp2_conversion_verify_and_reshard(tmp_path):
    # GQA, tied, vocab 300 (384 rows at TP=1, 512 at TP=2): converted at TP=1 here, then verified at
    # TP=2 and PP=2 (resharding on load), and converted at PP=2 by the worker.
    qwen2 = make_tiny_hf_model(tmp_path / "qwen2", "qwen2")
    llama = make_tiny_hf_model(
        tmp_path / "llama", "llama"
    )  # untied, llama3 RoPE: converted at TP=2
    try:
        convert_hf_to_megatron(qwen2, tmp_path / "qwen2_tp1", target_dtype="fp32")
    finally:
        destroy_distributed()
    run_torchrun(
        WORKER,
        [
            "--tp-hf",
            str(llama),
            "--pp-hf",
            str(qwen2),
            "--tp1-checkpoint",
            str(tmp_path / "qwen2_tp1"),
            "--out",
            str(tmp_path / "out"),
        ],
        nproc=2,
        timeout=360,
        result_dir=tmp_path,
    )
    for rank in read_rank_results(tmp_path, 2):
        assert rank["tp2_status"] == 0 and rank["pp2_status"] == 0
        assert 0 <= rank["tp1_checkpoint_at_tp2"] <= 1e-4
        assert 0 <= rank["tp1_checkpoint_at_pp2"] <= 1e-4
    rank0 = read_rank_results(tmp_path, 2)[0]  # rank 0 prints the max_abs_logit_diff= line
    assert 0 <= rank0["tp2_cli_diff"] <= 1e-4 and 0 <= rank0["pp2_cli_diff"] <= 1e-4

    # Saved at TP=2 the embedding holds 512 rows; exported in one process it is the HF model again.
    stored = dist_checkpointing.load_tensors_metadata(str(tmp_path / "out" / "tp2" / "release"))
    assert (
        stored["embedding.word_embeddings.weight"].global_shape[0] == 512 != -(-VOCAB // 128) * 128
    )
    try:
        for name, source in (("tp2", llama), ("pp2", qwen2)):
            convert_megatron_to_hf(tmp_path / "out" / name, tmp_path / f"hf_{name}")
            expected, actual = (
                safetensors_weights(source),
                safetensors_weights(tmp_path / f"hf_{name}"),
            )
            assert sorted(actual) == sorted(expected)
            assert all(actual[k].equal(expected[k]) for k in expected)
    finally:
        destroy_distributed()


@pytest.mark.timeout(150)
def test_cli_reports_bad_input_with_exit_status_2(tmp_path):
    hf = make_tiny_hf_model(tmp_path / "hf", "qwen3")
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert_hf_to_megatron.py"),
            "--hf-path",
            str(hf),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "already exists; pass --overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
