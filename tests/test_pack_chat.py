"""Chat data: `messages` records through the tokenizer's own chat template, loss on assistant turns.

Expected values come from transformers itself (``apply_chat_template``, ``decode``) on three real
templates carried as data (tests/chat_templates.py): the packed ids must be the template's ids
exactly, and the masked spans must decode to the assistant contents plus the end-of-turn.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from megatron_rift.data import PackConfig, RewardDataset, RolloutDataError, pack_rollouts
from megatron_rift.data.batching import collate_rollouts
from megatron_rift.generation import end_of_turn_ids
from tests.chat_templates import END_OF_TURN, FAMILIES, build_chat_tokenizer
from tests.rollout_fixtures import PACK_CLI, corpus, write_jsonl
from tests.tiny_tokenizers import build_bpe_tokenizer

ONE_TURN = [
    {"role": "user", "content": "add two and three"},
    {"role": "assistant", "content": "two and three to get five"},
]
WITH_SYSTEM = [
    {"role": "system", "content": "the answer is in a box"},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
]
THREE_TURNS = [
    {"role": "user", "content": "name a colour"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "another one"},
    {"role": "assistant", "content": " blue green "},  # Llama 3's template trims it
    {"role": "user", "content": "the sum of two and three"},
    {"role": "assistant", "content": "the total is five"},
]
CONVERSATIONS = [ONE_TURN, WITH_SYSTEM, THREE_TURNS]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    records = [{"messages": c, "reward": 1.0} for c in CONVERSATIONS]
    # Same conversation but the last reply: the same group; the reply itself is the response.
    records.append({"messages": ONE_TURN[:1] + [{"role": "assistant", "content": "five"}]})
    records[-1]["correct"] = False
    write_jsonl(root / "chats.jsonl", records)
    for family in FAMILIES:
        build_chat_tokenizer(root / family, family, corpus())
    return root


def pack(root, name, tokenizer, inputs=None, **options):
    prefix = root / "out" / name
    summary = pack_rollouts(
        PackConfig(
            inputs=[str(p) for p in inputs or [root / "chats.jsonl"]],
            output_prefix=str(prefix),
            tokenizer=str(tokenizer),
            progress=False,
            overwrite=True,
            **options,
        )
    )
    return RewardDataset(str(prefix)), summary


def masked_texts(tok, item) -> list[str]:
    """The decoded runs of 1s in an item's loss mask."""
    mask = np.concatenate([item["loss_mask"], [0]])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask])))
    return [tok.decode(item["tokens"][a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def replies(family, conversation, train_on):
    """What the masked spans must decode to: assistant contents as the template writes them."""
    turns = [m["content"] for m in conversation if m["role"] == "assistant"]
    turns = turns if train_on == "all-assistant" else turns[-1:]
    return [(t.strip() if family == "llama3" else t) + END_OF_TURN[family] for t in turns]


@pytest.mark.parametrize("train_on", ["last-assistant", "all-assistant"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokens_are_the_templates_and_the_mask_is_the_assistant_turns(root, family, train_on):
    tok = AutoTokenizer.from_pretrained(str(root / family))
    ds, summary = pack(root, f"{family}_{train_on}", root / family, train_on=train_on)
    assert len(ds) == len(CONVERSATIONS) + 1
    for i, conversation in enumerate(CONVERSATIONS):
        item = ds[i]
        expected = tok.apply_chat_template(conversation, return_dict=True)["input_ids"]
        assert item["tokens"].tolist() == list(expected)
        assert masked_texts(tok, item) == replies(family, conversation, train_on)
    assert ds.groups[3] == ds.groups[0] != ds.groups[1]  # a group: the conversation minus its reply
    assert ds.loss_tokens.tolist() == [int(ds[i]["loss_mask"].sum()) for i in range(len(ds))]
    chat = summary["chat_template"]
    assert chat["sha256"] == hashlib.sha256(FAMILIES[family][0].encode()).hexdigest()
    assert chat["end_of_turn"] == END_OF_TURN[family] and chat["train_on"] == train_on
    assert chat["mask"] == ("generation-markers" if family == "gemma-markers" else "prefixes")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_first_reply_token_and_end_of_turn_are_trained_and_nothing_else(root, family):
    """The boundary bugs peers report: the first response token dropped, template or user
    tokens trained, a stop token other than the one generation stops on."""
    tok = AutoTokenizer.from_pretrained(str(root / family))
    ds, _ = pack(root, f"{family}_boundaries", root / family)
    stop = end_of_turn_ids(root / family)  # what generation stops on
    assert stop == [tok.convert_tokens_to_ids(END_OF_TURN[family])]
    assert stop != [tok.eos_token_id]
    for i, conversation in enumerate(CONVERSATIONS):
        item = ds[i]
        start, end = item["response_start"], item["response_end"]
        mask = item["loss_mask"]
        # Everything before the reply is exactly the prompt generation samples from.
        prompt = tok.apply_chat_template(
            conversation[:-1], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        assert item["tokens"][:start].tolist() == list(prompt)
        assert mask[start] == 1 and not mask[:start].any()  # first reply token in, no other role
        assert item["tokens"][end - 1] == stop[0] and mask[end - 1] == 1 and not mask[end:].any()
        # In the trainer's batch: the label of the last masked position is the end-of-turn.
        batch = collate_rollouts([item], seq_length=len(item["tokens"]) + 1, pad_id=0)
        labels = batch["labels"][0][batch["loss_mask"][0] > 0].tolist()
        assert labels[-1] == stop[0] and labels == item["tokens"][start:end].tolist()


def test_prompt_response_records_under_chat_template_end_with_the_end_of_turn(root):
    """--chat-template: a one-turn conversation, ended by <|im_end|> rather than EOS."""
    tok = AutoTokenizer.from_pretrained(str(root / "qwen2.5"))
    records = [{"prompt": "add two and three", "response": "five", "reward": 1.0}]
    inputs = [write_jsonl(root / "plain.jsonl", records)]
    ds, summary = pack(root, "plain_chat", root / "qwen2.5", inputs, chat_template=True)
    conversation = [
        {"role": "user", "content": "add two and three"},
        {"role": "assistant", "content": "five"},
    ]
    assert (
        ds[0]["tokens"].tolist()
        == tok.apply_chat_template(conversation, return_dict=True)["input_ids"]
    )
    assert masked_texts(tok, ds[0]) == ["five<|im_end|>"]
    assert tok.eos_token == "<|endoftext|>" and summary["chat_template"]["end_of_turn"] == (
        "<|im_end|>"
    )


def test_ground_truth_pairs_of_a_conversation(root):
    """--pairs ground-truth on a messages record: the solution replaces the last assistant turn."""
    tok = AutoTokenizer.from_pretrained(str(root / "llama3"))
    records = [{"messages": WITH_SYSTEM, "correct": False, "solution": "5"}]
    inputs = [write_jsonl(root / "pairs.jsonl", records)]
    ds, summary = pack(root, "pairs", root / "llama3", inputs, pairs="ground-truth")
    truth = [*WITH_SYSTEM[:-1], {"role": "assistant", "content": "5"}]
    assert summary["num_pairs"] == 1 and ds.groups[0] == ds.groups[1]
    for i, conversation in enumerate([truth, WITH_SYSTEM]):  # chosen: the truth (rollout wrong)
        ids = tok.apply_chat_template(conversation, return_dict=True)["input_ids"]
        assert ds[i]["tokens"].tolist() == list(ids)
        assert masked_texts(tok, ds[i]) == replies("llama3", conversation, "last-assistant")


def test_two_workers_match_one(root):
    one, _ = pack(root, "w1", root / "qwen2.5", train_on="all-assistant")
    two, _ = pack(root, "w2", root / "qwen2.5", train_on="all-assistant", workers=2, chunk_size=1)
    for i in range(len(one)):
        assert one[i]["tokens"].tolist() == two[i]["tokens"].tolist()
        assert one[i]["loss_mask"].tolist() == two[i]["loss_mask"].tolist()


def test_plain_records_and_conversations_in_one_chunk(root):
    """Without --chat-template a prompt/response record stays plain (prompt + response + EOS)
    next to conversations, also in one worker's chunk."""
    tok = AutoTokenizer.from_pretrained(str(root / "qwen2.5"))
    plain = {"prompt": "add two", "response": "five", "reward": 1.0}
    inputs = [write_jsonl(root / "mixed.jsonl", [plain, {"messages": ONE_TURN, "reward": 1.0}])]
    ds, _ = pack(root, "mixed", root / "qwen2.5", inputs, workers=2)
    expected = tok("add two")["input_ids"] + tok("five", add_special_tokens=False)["input_ids"]
    assert ds[0]["tokens"].tolist() == expected + [tok.eos_token_id]
    assert masked_texts(tok, ds[0]) == ["five<|endoftext|>"]
    assert masked_texts(tok, ds[1]) == ["two and three to get five<|im_end|>"]


def test_saved_dataset_folder_and_globs_read_like_jsonl(root):
    import datasets

    records = [{"messages": c, "reward": 1.0} for c in CONVERSATIONS]
    datasets.Dataset.from_list(records[:2]).save_to_disk(str(root / "saved"))
    (root / "parts").mkdir()
    write_jsonl(root / "parts" / "a.jsonl", records[2:])
    write_jsonl(root / "parts" / "b.jsonl", records[:1])
    ds, summary = pack(
        root, "mixed_inputs", root / "llama3", [root / "saved", root / "parts/*.jsonl"]
    )
    reference, _ = pack(
        root, "one_file", root / "llama3", [write_jsonl(root / "all.jsonl", records + records[:1])]
    )
    assert len(ds) == len(reference) == 4
    for i in range(4):
        assert ds[i]["tokens"].tolist() == reference[i]["tokens"].tolist()
        assert ds[i]["loss_mask"].tolist() == reference[i]["loss_mask"].tolist()
    assert summary["input_files"][1:] == [str(root / "parts" / n) for n in ("a.jsonl", "b.jsonl")]


# Earlier assistant turns shortened to "...", as reasoning templates drop old thoughts.
REWRITES_HISTORY = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{{ '...' if m.role == 'assistant' and not loop.last else m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_rewrites_history_is_refused_naming_the_turn(root):
    """Earlier turns a template rewrites cannot be trained: their tokens in the conversation are
    not what the model produced there."""
    tokenizer = AutoTokenizer.from_pretrained(str(root / "qwen2.5"))
    tokenizer.chat_template = REWRITES_HISTORY
    tokenizer.save_pretrained(str(root / "rewrites"))
    pack(root, "rewrites_last", root / "rewrites")  # the last turn alone is fine
    with pytest.raises(RolloutDataError, match=r"chats.jsonl:3: messages\[1\] \(assistant\)"):
        pack(root, "rewrites_all", root / "rewrites", train_on="all-assistant")


def _cli():
    spec = importlib.util.spec_from_file_location("pack_rollouts_cli", PACK_CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOOD = {"messages": ONE_TURN, "reward": 1.0}
PLAIN = {"prompt": "add two", "response": "five", "reward": 1.0}  # fine with any tokenizer
BAD_RECORDS = [
    ("no_assistant", {"messages": ONE_TURN[:1], "reward": 1.0}, "has no assistant turn"),
    (
        "ends_with_user",
        {"messages": [*ONE_TURN, {"role": "user", "content": "and?"}], "reward": 1.0},
        "last message of 'messages' is a user turn",
    ),
    (
        "unknown_role",
        {"messages": [{"role": "human", "content": "hi"}, ONE_TURN[1]], "reward": 1.0},
        "messages[0] has role 'human'",
    ),
    (
        "content_parts",
        {"messages": [{"role": "user", "content": [{"type": "text"}]}, ONE_TURN[1]], "reward": 1},
        "messages[0] (user) needs 'content' as a string, got list",
    ),
    ("no_template", GOOD, "has no chat template"),
]


@pytest.mark.parametrize("name,record,needle", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_conversations_name_the_line_exit_2_and_write_nothing(
    root, tmp_path, capsys, name, record, needle
):
    if name == "no_template" and not (root / "no_template").exists():
        build_bpe_tokenizer(root / "no_template", corpus(), vocab_size=300, chat_template=None)
    tokenizer = root / ("no_template" if name == "no_template" else "qwen2.5")
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(PLAIN) + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "out"
    code = _cli().main(
        ["--input", str(data), "--output-prefix", str(out / "ds"), "--tokenizer", str(tokenizer)]
        + ["--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: " in err and needle in err, err
    assert not out.exists() or not list(out.iterdir())
