"""Chat data end to end on the demo's tiny model: generate `messages` rollouts with a ChatML
tokenizer (tools/generate_rollouts.py, a system prompt) -> pack -> train -> export -> generate
again, through the same chat template at every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from megatron_rift.data import RewardDataset
from megatron_rift.demo import stages
from megatron_rift.demo.config import DemoConfig
from megatron_rift.demo.task import generate_splits, task_texts
from megatron_rift.generation import (
    SamplingConfig,
    generate_rollouts,
    load_prompt_tokenizer,
    read_generation_problems,
)
from megatron_rift.rewards import get_verifier
from tests.chat_templates import build_chat_tokenizer
from tests.rollout_fixtures import corpus
from tests.torchrun_utils import REPO

SYSTEM = "Answer in a box."


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _initial_model(root, tokenizer_dir):
    """A random Llama that often ends its reply with <|im_end|> (a raised lm_head row against a
    common component of every hidden state), saved with the chat tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.2)
        model.lm_head.weight[:3] = -1.0  # no special token but the end-of-turn
        model.model.embed_tokens.weight += 1.0
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>")] = 0.1
    model.save_pretrained(root / "model0")
    tok.save_pretrained(root / "model0")
    return root / "model0"


def _check_records(records, tok):
    for r in records:
        *conversation, reply = r["messages"]
        assert conversation == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": r["question"]},
        ]
        assert reply == {"role": "assistant", "content": r["response"]}
        assert r["prompt"] == tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        assert "<|im_end|>" not in r["response"]
    assert any(r["finish_reason"] == "eos" and r["response"] for r in records)


def test_generate_pack_train_export_generate_with_messages(tmp_path):
    splits = generate_splits(seed=0, sizes={"base": 40, "train": 6, "val": 1, "test": 1, "ood": 1})
    texts = corpus() + list(task_texts(p for s in splits.values() for p in s))
    tokenizer_dir = build_chat_tokenizer(tmp_path / "tokenizer", "qwen2.5", texts)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"question": p.question, "answer": p.answer, "prompt_id": p.prompt_id})
            + "\n"
            for p in splits["train"]
        )
    )
    model0 = _initial_model(tmp_path, tokenizer_dir)

    rollouts = tmp_path / "rollouts.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "generate_rollouts.py"), "--model", str(model0)]
        + ["--problems", str(problems), "--output", str(rollouts), "--system-prompt", SYSTEM]
        + ["--num-samples", "4", "--max-new-tokens", "12", "--backend", "transformers"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_records([json.loads(line) for line in rollouts.read_text().splitlines()], tok)

    # The records as they are (minus empty replies, as the demo drops them) -> packed dataset.
    cfg = DemoConfig(
        output_dir=str(tmp_path),
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        seq_length=192,
        max_new_tokens=12,
        micro_batch_size=4,
    )
    trainable, _ = stages.drop_empty_responses(rollouts)
    stages.pack([trainable], tmp_path / "data" / "chat", tokenizer_dir, cfg)
    ds = RewardDataset(str(tmp_path / "data" / "chat"))
    records = [json.loads(line) for line in trainable.read_text().splitlines()]
    assert len(ds) == len(records) and ds.info["overlong"] == 0
    assert ds.info["chat_template"]["end_of_turn"] == "<|im_end|>"
    for i, record in enumerate(records):
        item = ds[i]
        ids = tok.apply_chat_template(record["messages"], return_dict=True)["input_ids"]
        assert item["tokens"].tolist() == list(ids)
        reply = tok.decode(item["tokens"][item["response_start"] : item["response_end"]].tolist())
        assert reply == record["response"] + "<|im_end|>"

    # Train the demo's tiny model on them, export it (with the chat tokenizer), sample again.
    metrics = stages.train(
        cfg, tmp_path / "data" / "chat", tmp_path / "ckpt", "rift", 1e-3, 1.0, 8, tmp_path / "logs"
    )
    assert [json.loads(line) for line in metrics.read_text().splitlines()]
    hf = stages.export_hf(tmp_path / "ckpt", tmp_path / "hf", tmp_path / "logs")
    exported = load_prompt_tokenizer(hf)
    assert exported.get_chat_template() == tok.get_chat_template()
    again = generate_rollouts(
        hf,
        read_generation_problems(problems, tokenizer=exported, system_prompt=SYSTEM),
        get_verifier("math"),
        SamplingConfig(num_samples=2, max_new_tokens=8, seed=1),
        backend="transformers",
        show_progress=False,
    )
    assert len(again) == 2 * len(splits["train"])
    for r in again:
        assert r["messages"][:-1][0] == {"role": "system", "content": SYSTEM}
        assert r["messages"][-1] == {"role": "assistant", "content": r["response"]}
