"""Rollout generation with a tiny random Llama and the demo tokenizer: reproducibility, rewards,
left padding, EOS handling, prompt rendering (chat template or default), the CLI."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rift.demo.task import generate_splits, task_texts, write_problems_jsonl
from megatron_rift.generation import (
    DEFAULT_PROMPT_TEMPLATE,
    ProblemsInputError,
    SamplingConfig,
    generate_rollouts,
    load_prompt_tokenizer,
    read_generation_problems,
    render_question,
    vllm_available,
)
from megatron_rift.generation.backends import _decode_sample, encode_prompts
from megatron_rift.rewards import extract_final_answer, get_verifier
from tests.rollout_fixtures import corpus
from tests.tiny_tokenizers import TINY_CHAT_TEMPLATE, build_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 24


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # A tiny model gains nothing from threads, and on a busy 2-core machine OpenMP threads spinning
    # against other processes made generate() 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM with the demo tokenizer saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rift.demo.tokenizer import train_demo_tokenizer, vocab_size_of

    root = tmp_path_factory.mktemp("gen")
    splits = generate_splits(
        seed=0, sizes={"base": 200, "train": 10, "val": 1, "test": 10, "ood": 1}
    )
    tokenizer = train_demo_tokenizer(
        task_texts(p for s in splits.values() for p in s), root / "tok", vocab_size=340
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size_of(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits spread over several units: argmax is clear at a tiny temperature
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(root / "model")
    for path in tokenizer.iterdir():
        shutil.copy(path, root / "model")
    write_problems_jsonl(splits["test"][:6], root / "problems.jsonl")
    return root / "model"


def _problems(model_dir):
    return read_generation_problems(model_dir.parent / "problems.jsonl")


def _rollouts(model_dir, problems, seed=0, batch_size=4, **sampling):
    config = SamplingConfig(num_samples=4, max_new_tokens=MAX_NEW, seed=seed, **sampling)
    return generate_rollouts(
        model_dir,
        problems,
        get_verifier("math"),
        config,
        backend="transformers",
        batch_size=batch_size,
        show_progress=False,
    )


def test_same_seed_same_rollouts_and_rewards_match_the_verifier(model_dir):
    problems = _problems(model_dir)
    first = _rollouts(model_dir, problems, seed=0)
    assert first == _rollouts(model_dir, problems, seed=0)
    assert [r["response"] for r in first] != [
        r["response"] for r in _rollouts(model_dir, problems, seed=1)
    ]
    assert len(first) == 4 * len(problems)
    for index, record in enumerate(first):
        problem = problems[index // 4]
        assert record["prompt_id"] == problem.prompt_id and record["prompt"] == problem.prompt
        assert record["sample_index"] == index % 4 and record["answer"] == problem.answer
        assert record["reward"] == get_verifier("math").verify(record["response"], problem.answer)
        assert record["correct"] == (record["reward"] == 1.0)
        assert record["finish_reason"] in ("eos", "length")
        if record["finish_reason"] == "length":
            assert record["num_response_tokens"] == MAX_NEW
    # Make some rollouts correct: take a sampled answer as the reference, regenerate with the seed.
    answered = {}
    for record in first:
        extracted = extract_final_answer(record["response"])
        if extracted is not None and record["prompt_id"] not in answered:
            answered[record["prompt_id"]] = extracted.replace(",", "")
    assert answered, "the random model wrote no number at all; raise MAX_NEW"
    for problem in problems:
        problem.answer = answered.get(problem.prompt_id, problem.answer)
    again = _rollouts(model_dir, problems, seed=0)
    assert [r["response"] for r in again] == [r["response"] for r in first]
    verifier = get_verifier("math")
    assert sum(r["correct"] for r in again) >= len(answered)
    assert all(r["reward"] == verifier.verify(r["response"], r["answer"]) for r in again)


def test_left_padded_batches_match_unpadded_greedy_decoding(model_dir):
    """At a vanishing temperature sampling is argmax; batched, left-padded prompts must then give
    what unpadded greedy decoding of each prompt alone gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems = _problems(model_dir)
    lengths = {len(p.prompt) for p in problems}
    assert len(lengths) > 1  # the batch really is padded
    rollouts = _rollouts(model_dir, problems, batch_size=6, temperature=1e-4, top_p=1.0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for index, problem in enumerate(problems):
        ids = torch.tensor([tokenizer.encode(problem.prompt)])
        with torch.no_grad():
            greedy = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=MAX_NEW,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=0,
            )
        expected = _decode_sample(tokenizer, greedy[0, ids.shape[1] :].tolist(), [2]).text
        assert rollouts[index * 4]["response"] == expected


def test_decode_stops_at_eos(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(" 12+3=15. \\boxed{15}")
    eos = tokenizer.eos_token_id
    stopped = _decode_sample(tokenizer, ids + [eos] + ids + [0, 0], [eos])
    assert (stopped.text, stopped.finish_reason, stopped.num_tokens) == (
        " 12+3=15. \\boxed{15}",
        "eos",
        len(ids),
    )
    assert _decode_sample(tokenizer, ids, [eos]).finish_reason == "length"
    # A second stop id (chat models name several in their generation config) stops too.
    other = _decode_sample(tokenizer, ids[:3] + [7] + ids, [eos, 7])
    assert (other.finish_reason, other.num_tokens) == ("eos", 3)


def test_read_generation_problems(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"question": "What is 1+1?", "answer": 2}),
                json.dumps({"prompt": "RAW PROMPT", "answer": "x", "prompt_id": "raw"}),
                "",
            ]
        )
    )
    first, second = read_generation_problems(path, prompt_template="Problem: {question}\nSolution:")
    assert first.prompt == "Problem: What is 1+1?\nSolution:" and first.answer == "2"
    assert first.prompt_id == "p-000001" and first.question == "What is 1+1?"
    assert (second.prompt, second.prompt_id, second.question) == ("RAW PROMPT", "raw", None)


def test_questions_use_the_chat_template_or_the_documented_default(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "What is 1+1?", "answer": 2}) + "\n")
    chat = load_prompt_tokenizer(build_bpe_tokenizer(tmp_path / "chat", corpus(), vocab_size=300))
    plain = load_prompt_tokenizer(
        build_bpe_tokenizer(tmp_path / "plain", corpus(), vocab_size=300, chat_template=None)
    )
    # One user turn, then the assistant header (TINY_CHAT_TEMPLATE's markup).
    assert (
        read_generation_problems(path, tokenizer=chat)[0].prompt
        == "<|user|>What is 1+1?\n<|assistant|>"
    )
    assert (
        read_generation_problems(path, tokenizer=plain)[0].prompt
        == DEFAULT_PROMPT_TEMPLATE.format(question="What is 1+1?")
        == "What is 1+1?\n"
    )
    assert read_generation_problems(path)[0].prompt == "What is 1+1?\n"  # no tokenizer at all
    # An explicit template (--prompt-template) wins over the chat template.
    assert render_question("q", chat, prompt_template="Q: {question}\nA:") == "Q: q\nA:"


def test_system_prompt_goes_into_the_chat_template_and_needs_one(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "What is 1+1?", "answer": 2}) + "\n")
    chat = load_prompt_tokenizer(build_bpe_tokenizer(tmp_path / "chat", corpus(), vocab_size=300))
    (problem,) = read_generation_problems(path, tokenizer=chat, system_prompt="Be brief.")
    assert problem.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1+1?"},
    ]
    assert problem.prompt == "<|system|>Be brief.\n<|user|>What is 1+1?\n<|assistant|>"
    with pytest.raises(ValueError, match="--system-prompt needs the tokenizer's chat template"):
        read_generation_problems(path, "Q: {question}", chat, system_prompt="Be brief.")


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_chat_template_that_writes_bos_does_not_double_it(tmp_path, add_bos):
    folder = build_bpe_tokenizer(
        tmp_path / "tok",
        corpus(),
        vocab_size=300,
        add_bos=add_bos,
        chat_template="{{ bos_token }}" + TINY_CHAT_TEMPLATE,
    )
    tokenizer = load_prompt_tokenizer(folder)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "hi", "answer": 1}) + "\n")
    (problem,) = read_generation_problems(path, tokenizer=tokenizer)
    assert problem.prompt == "<s><|user|>hi\n<|assistant|>"  # the template's text, its BOS too
    assert problem.messages == [{"role": "user", "content": "hi"}]
    # How generation encodes it: a chat prompt gets no special tokens of the tokenizer's own.
    (ids,) = encode_prompts(tokenizer, [problem.prompt], [problem.messages is None])
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert (
        ids
        == tokenizer.apply_chat_template(
            problem.messages, add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )


def test_only_the_demo_imports_the_demo():
    """Generation and the rest of the package must not fall back on the demo's toy task."""
    package = REPO / "megatron_rift"
    # cli.py is the console script that dispatches to every stage, the demo included: it sits
    # above the demo, not below it.
    above_the_demo = {package / "cli.py"}
    offenders = []
    for path in package.rglob("*.py"):
        if (package / "demo") in path.parents or path in above_the_demo:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno}"
                for name in names
                if name == "megatron_rift.demo" or name.startswith("megatron_rift.demo.")
            ]
    assert not offenders, f"imports of megatron_rift.demo outside demo/: {offenders}"


def test_check_references():
    from megatron_rift.generation import GenerationProblem, check_references

    problems = [GenerationProblem("a", "Q", "12"), GenerationProblem("b", "Q", "")]
    assert check_references(problems, get_verifier("math")) == [
        "b"
    ]  # empty: every rollout scores 0
    with pytest.raises(ValueError, match="problem 'c': .*not an integer"):
        check_references(
            problems[:1] + [GenerationProblem("c", "Q", "0.5")], get_verifier("integer")
        )


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("not json", "not valid JSON"),
        (json.dumps({"answer": "1"}), "'prompt' or 'question'"),
        (json.dumps({"question": "q"}), "needs field 'answer'"),
        (json.dumps({"question": "q", "answer": "1", "prompt_id": "a"}), "already used on line 1"),
    ],
)
def test_bad_problem_records_name_the_line(tmp_path, bad_line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"question": "q", "answer": "1", "prompt_id": "a"}) + "\n" + bad_line + "\n"
    )
    with pytest.raises(ProblemsInputError, match=rf"p.jsonl:2: .*{message}"):
        read_generation_problems(path)


def test_cli_output_equals_the_library_and_rejects_bad_input(model_dir, tmp_path):
    output = tmp_path / "rollouts.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "generate_rollouts.py"),
            "--model",
            str(model_dir),
            "--problems",
            str(model_dir.parent / "problems.jsonl"),
            "--output",
            str(output),
            "--num-samples",
            "3",
            "--max-new-tokens",
            "12",
            "--seed",
            "5",
            "--batch-size",
            "2",
            "--backend",
            "transformers",
            "--limit",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    config = SamplingConfig(num_samples=3, max_new_tokens=12, seed=5)
    expected = generate_rollouts(
        model_dir,
        _problems(model_dir)[:3],
        get_verifier("math"),
        config,
        backend="transformers",
        batch_size=2,
        show_progress=False,
    )
    assert records == expected  # same seed, other process: same rollouts
    assert {
        "prompt",
        "response",
        "reward",
        "correct",
        "prompt_id",
        "answer",
        "sample_index",
    } <= set(records[0])
    # Bad input: non-zero exit naming the line, and no output file.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    out = tmp_path / "none.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "generate_rollouts.py"),
            "--model",
            str(model_dir),
            "--problems",
            str(bad),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "bad.jsonl:1" in result.stderr and not out.exists()


@pytest.mark.skipif(
    not vllm_available(), reason="vLLM is not installed (GPU-only optional backend)"
)
def test_vllm_backend_runs(model_dir):
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    records = generate_rollouts(
        model_dir,
        _problems(model_dir),
        get_verifier("math"),
        SamplingConfig(num_samples=2, max_new_tokens=8),
        backend="vllm",
    )
    assert len(records) == 12 and all(r["reward"] in (0.0, 1.0) for r in records)
