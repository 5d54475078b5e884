"""The demo task (determinism, correct answers, disjoint splits, harder OOD, user files) and its
tokenizer (exact round trips, same ids as the SentencePiece model, AutoTokenizer reload)."""

import json
import re

import pytest

from megatron_rift.demo.task import (
    IN_DISTRIBUTION,
    OUT_OF_DISTRIBUTION,
    ProblemsFileError,
    generate_splits,
    load_problems_file,
    task_texts,
)
from megatron_rift.rewards import get_verifier

SIZES = {"base": 600, "train": 120, "val": 60, "test": 120, "ood": 120}


@pytest.fixture(scope="module")
def splits():
    return generate_splits(seed=3, sizes=SIZES)


# An independent reading of the question text: the phrases the task promises, and what they do.
_SENTENCE_EFFECTS = [
    (r"(?:buys|finds|gets) (\d+) more", lambda v, n: v + n),
    (r"(?:gives away|loses|sells) (\d+)", lambda v, n: v - n),
    (r"doubles them", lambda v, n: v * 2),
    (r"triples them", lambda v, n: v * 3),
    (r"gives away half", lambda v, n: v / 2),
]


def _solve_question(question):
    """Returns (answer, number of operations, largest value on the way) from the question's words."""
    sentences = [s.strip() for s in question.split(".")]
    head = re.fullmatch(r"(\w+) has (\d+) (\w+)", sentences[0])
    assert head, question
    name, value = head.group(1), int(head.group(2))
    steps, largest = 0, value
    for sentence in sentences[1:-1]:
        assert sentence.startswith(name + " "), sentence
        action = sentence[len(name) + 1 :]
        for pattern, effect in _SENTENCE_EFFECTS:
            match = re.fullmatch(pattern, action)
            if match:
                value = effect(value, int(match.group(1)) if match.groups() else 0)
                largest = max(largest, value)
                break
        else:
            raise AssertionError(f"unknown sentence {sentence!r}")
        assert value >= 0 and value == int(value), (question, value)
        steps += 1
    assert sentences[-1] == f"How many {head.group(3)} does {name} have now?"
    return int(value), steps, largest


def test_deterministic_by_seed():
    first = generate_splits(seed=3, sizes=SIZES)
    again = generate_splits(seed=3, sizes=SIZES)
    other = generate_splits(seed=4, sizes=SIZES)
    assert [p.to_record() for s in first.values() for p in s] == [
        p.to_record() for s in again.values() for p in s
    ]
    assert [p.question for p in first["test"]] != [p.question for p in other["test"]]
    # Held-out splits do not depend on how much base data is drawn.
    bigger_base = generate_splits(seed=3, sizes=dict(SIZES, base=900))
    for split in ("train", "val", "test", "ood"):
        assert [p.question for p in bigger_base[split]] == [p.question for p in first[split]]


def test_answers_match_an_independent_reading_of_the_question(splits):
    math = get_verifier("math")
    for split, problems in splits.items():
        assert len(problems) == SIZES[split]
        for problem in problems:
            answer, _, _ = _solve_question(problem.question)
            assert problem.answer == str(answer), problem.question
            # Both solution styles end in the boxed answer, and every written step is true arithmetic.
            for solution in (problem.solution, problem.expert_solution):
                assert solution.endswith(f"\\boxed{{{answer}}}")
                assert math.verify(solution, problem.answer) == 1.0
            for lhs, rhs in re.findall(r"(\d+[-+*/]\d+)=(\d+)\.", problem.solution):
                assert eval(lhs) == int(rhs)  # noqa: S307 (digits and one operator only)
            for side in problem.expert_solution.split(". So")[0].split(" = "):
                assert eval(side.strip()) == answer  # noqa: S307 (digits, operators, parentheses)


def test_expert_style_differs_from_model_style(splits):
    for problem in splits["train"]:
        assert problem.solution != problem.expert_solution
        assert "So the answer is" in problem.expert_solution
        assert "So the answer is" not in problem.solution
        n_steps = len(problem.operations)
        assert problem.solution.count("=") == n_steps
        assert problem.expert_solution.count(" = ") == n_steps


def test_splits_are_disjoint(splits):
    seen = {}
    for split, problems in splits.items():
        for problem in problems:
            assert problem.question not in seen, (
                problem.question,
                split,
                seen.get(problem.question),
            )
            seen[problem.question] = split
        assert len({p.prompt_id for p in problems}) == len(problems)


def test_ood_is_harder_by_construction(splits):
    def shape(problems):
        readings = [_solve_question(p.question) for p in problems]
        return [steps for _, steps, _ in readings], [largest for _, _, largest in readings]

    id_steps, id_values = shape(splits["test"] + splits["train"] + splits["val"])
    ood_steps, ood_values = shape(splits["ood"])
    assert max(id_steps) < min(ood_steps)  # more operations, every time
    assert max(id_values) <= IN_DISTRIBUTION.max_value < max(ood_values)  # and larger numbers
    assert sum(ood_values) / len(ood_values) > 1.2 * sum(id_values) / len(id_values)
    assert sum(len(p.solution) for p in splits["ood"]) / len(splits["ood"]) > 1.2 * sum(
        len(p.solution) for p in splits["test"]
    ) / len(splits["test"])
    # Reachable: a share of the base split has the OOD shape (more steps than in-distribution).
    base_steps, _ = shape(splits["base"])
    share = sum(s >= OUT_OF_DISTRIBUTION.min_steps for s in base_steps) / len(base_steps)
    assert 0.03 < share < 0.25


def test_prompt_format(splits):
    problem = splits["test"][0]
    assert problem.prompt == f"Q: {problem.question}\nA:"
    assert problem.solution.startswith(" ") and problem.expert_solution.startswith(" ")
    record = problem.to_record()
    assert record["prompt"] == problem.prompt and record["answer"] == problem.answer


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_problems_file_loader(tmp_path):
    path = _write_lines(
        tmp_path / "p.jsonl",
        [
            json.dumps(
                {
                    "question": "What is 2+3?",
                    "answer": 5,
                    "split": "train",
                    "solution": "2+3=5. \\boxed{5}",
                }
            ),
            "",
            json.dumps(
                {
                    "question": "What is 1/2 of 1?",
                    "answer": "\\frac{1}{2}",
                    "split": "ood",
                    "prompt_id": "half",
                }
            ),
        ],
    )
    problems = load_problems_file(path)
    assert [p.split for p in problems] == ["train", "ood"]
    assert problems[0].answer == "5" and problems[0].solution == " 2+3=5. \\boxed{5}"
    assert problems[0].expert_solution == problems[0].solution
    assert problems[1].prompt_id == "half" and problems[1].solution is None
    assert problems[1].prompt == "Q: What is 1/2 of 1?\nA:"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{oops", "not valid JSON"),
        (json.dumps(["question"]), "expected a JSON object"),
        (json.dumps({"answer": "1", "split": "train"}), "missing field 'question'"),
        (json.dumps({"question": "q", "split": "train"}), "missing field 'answer'"),
        (json.dumps({"question": "q", "answer": "1"}), "missing field 'split'"),
        (json.dumps({"question": "q", "answer": "1", "split": "base"}), "'split' is 'base'"),
        (json.dumps({"question": " ", "answer": "1", "split": "test"}), "'question' is empty"),
        (
            json.dumps({"question": "q", "answer": [1], "split": "test"}),
            "'answer' must be a string",
        ),
        (
            json.dumps({"question": "q", "answer": "1", "split": "test", "prompt_id": "a"}),
            "already used on line 1",
        ),
    ],
)
def test_problems_file_errors_name_the_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "q0", "answer": "1", "split": "train", "prompt_id": "a"})
    path = _write_lines(tmp_path / "user.jsonl", [good, "", bad_line])
    with pytest.raises(ProblemsFileError, match=rf"user.jsonl:3: .*{re.escape(message)}"):
        load_problems_file(path)


def test_problems_file_missing_or_empty(tmp_path):
    with pytest.raises(ProblemsFileError, match="no such problems file"):
        load_problems_file(tmp_path / "absent.jsonl")
    with pytest.raises(ProblemsFileError, match="empty"):
        load_problems_file(_write_lines(tmp_path / "empty.jsonl", [""]))


# ---- tokenizer ----


@pytest.fixture(scope="module")
def tokenizer_folder(splits, tmp_path_factory):
    from megatron_rift.demo.tokenizer import train_demo_tokenizer

    texts = list(task_texts(p for problems in splits.values() for p in problems))
    return train_demo_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer")


def test_tokenizer_round_trips_task_text_with_sentencepiece_ids(splits, tokenizer_folder):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_folder / "tokenizer.model"))
    texts = list(task_texts(p for problems in splits.values() for p in problems))
    texts += ["  two  spaces\tand a tab\n", "unseen: é∑ 🙂 Zebra", " leading", "trailing "]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids, text
        assert ids == processor.encode(text), text  # the HF tokenizer is the SentencePiece model
        assert tokenizer.decode(ids) == text
        assert processor.decode(ids) == text


def test_tokenizer_specials_and_digits(tokenizer_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.unk_token_id,
    ) == (0, 1, 2, 3)
    # Nothing is added around a text: whoever builds sequences appends </s> itself.
    assert tokenizer("12")["input_ids"] == tokenizer.encode("12", add_special_tokens=False)
    # Numbers are spelled one digit per token.
    pieces = tokenizer.convert_ids_to_tokens(
        tokenizer.encode("x 1234+56=1290", add_special_tokens=False)
    )
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == list("1234561290")
    # A response tokenizes the same alone as after its prompt.
    prompt, response = "Q: Tom has 5 apples.\nA:", " 5+3=8. \\boxed{8}"
    assert tokenizer.encode(prompt + response) == tokenizer.encode(prompt) + tokenizer.encode(
        response
    )
    assert len(tokenizer) <= 512


def test_tokenizer_folder_is_replaced_atomically(splits, tmp_path):
    from megatron_rift.demo.tokenizer import train_demo_tokenizer, vocab_size_of

    folder = tmp_path / "tok"
    texts = list(task_texts(splits["train"]))
    train_demo_tokenizer(texts, folder, vocab_size=340)
    train_demo_tokenizer(texts, folder, vocab_size=360)
    assert vocab_size_of(folder) <= 360
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folders left
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_demo_tokenizer(texts, folder, vocab_size=100)
    assert vocab_size_of(folder) <= 360  # a failed run leaves the previous folder as it was
