"""A synthetic, verifiable math task for the end-to-end demo: multi-step arithmetic word problems.

A problem is a start value and a chain of operations told in words::

    Q: Tom has 47 apples. Tom gets 6 more. Tom sells 3. Tom doubles them. How many apples does Tom have now?
    A:

Two solution styles end in the same ``\\boxed{answer}``:

* **model style** (what the demo's base model is pretrained on, hence what its rollouts look like)::

      47+6=53. 53-3=50. 50*2=100. \\boxed{100}

* **expert style** (the "ground-truth" solutions that SFT/DFT train on; like MATH's human-written
  references, a style of its own: the whole expression first, then reduced step by step)::

      (47+6-3)*2 = (53-3)*2 = 50*2 = 100. So the answer is \\boxed{100}

Splits (all disjoint by question text, each drawn from its own seeded stream so that e.g. changing the
base size does not change the test problems): ``base`` (pretraining the base model on model-style
solutions), ``train`` (post-training problems: rollouts come from these, their expert solutions feed
SFT/DFT), ``val`` (learning-rate sweeps), ``test`` (in distribution) and ``ood`` (harder: more steps and
larger numbers; a small share of ``base`` has that shape so that it is reachable, not pure extrapolation).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from megatron_rift.jsonl import iter_json_objects

# The demo's own prompt format: its base model is pretrained on it and its tokenizer has no chat
# template. Generation does not default to it; the demo passes prompts rendered with it.
PROMPT_TEMPLATE = "Q: {question}\nA:"
SPLITS = ("base", "train", "val", "test", "ood")
USER_SPLITS = ("train", "val", "test", "ood")
# Earlier splits claim a question first, so later ones (base last) never repeat it.
_SPLIT_PRIORITY = ("test", "ood", "val", "train", "base")

NAMES = ("Tom", "Ana", "Sam", "Mia")
ITEMS = ("apples", "coins", "books", "cards")
# op symbol -> sentence templates; "*" and "/" carry a fixed factor, "+" and "-" an operand n.
ADD_PHRASES = ("buys {n} more", "finds {n} more", "gets {n} more")
SUB_PHRASES = ("gives away {n}", "loses {n}", "sells {n}")
FACTOR_PHRASES = {("*", 2): "doubles them", ("*", 3): "triples them", ("/", 2): "gives away half"}


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How a problem is drawn: number of operations, start-value and +/- operand ranges (inclusive),
    and a bound on every intermediate value."""

    min_steps: int
    max_steps: int
    start_low: int
    start_high: int
    operand_low: int
    operand_high: int
    max_value: int


IN_DISTRIBUTION = Difficulty(
    min_steps=2,
    max_steps=3,
    start_low=10,
    start_high=99,
    operand_low=2,
    operand_high=9,
    max_value=199,
)
# Harder by construction: more operations and larger intermediate values.
OUT_OF_DISTRIBUTION = Difficulty(
    min_steps=4,
    max_steps=5,
    start_low=10,
    start_high=99,
    operand_low=2,
    operand_high=9,
    max_value=399,
)
DEFAULT_SIZES = {"base": 20000, "train": 500, "val": 200, "test": 500, "ood": 500}
# Share of base problems drawn with the OOD shape: the base model has seen a few such problems.
DEFAULT_BASE_OOD_FRACTION = 0.1


@dataclasses.dataclass
class Problem:
    """One problem. ``operations`` is ``[(symbol, operand), ...]`` applied left to right to ``start``;
    it is empty for problems loaded from a user's file (they only carry question/answer/solutions)."""

    prompt_id: str
    split: str
    question: str
    answer: str
    solution: str | None  # model style; the response the base model is pretrained on
    expert_solution: str | None  # ground-truth style for SFT/DFT
    start: int | None = None
    operations: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    def to_record(self) -> dict:
        record = dataclasses.asdict(self)
        record["prompt"] = self.prompt
        record["operations"] = [list(op) for op in self.operations]
        return record


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def apply_operation(value: int, symbol: str, operand: int) -> int:
    if symbol == "+":
        return value + operand
    if symbol == "-":
        return value - operand
    if symbol == "*":
        return value * operand
    if symbol == "/":
        if value % operand:
            raise ValueError(f"{value} is not divisible by {operand}")
        return value // operand
    raise ValueError(f"unknown operation {symbol!r}")


def model_solution(start: int, operations: list[tuple[str, int]]) -> str:
    """One ``a<op>b=c.`` step per operation, then the boxed answer; starts with a space (after ``A:``)."""
    steps, value = [], start
    for symbol, operand in operations:
        result = apply_operation(value, symbol, operand)
        steps.append(f"{value}{symbol}{operand}={result}.")
        value = result
    return " " + " ".join(steps) + f" \\boxed{{{value}}}"


def _expression(value: int, operations: list[tuple[str, int]]) -> str:
    """Left-nested expression text, parenthesizing a sum/difference before a product/quotient."""
    text, additive = str(value), False
    for symbol, operand in operations:
        if symbol in "*/" and additive:
            text = f"({text})"
        text += f"{symbol}{operand}"
        additive = symbol in "+-"
    return text


def expert_solution(start: int, operations: list[tuple[str, int]]) -> str:
    """The whole expression, reduced one operation at a time, then the boxed answer."""
    forms, value = [_expression(start, operations)], start
    for index, (symbol, operand) in enumerate(operations):
        value = apply_operation(value, symbol, operand)
        forms.append(_expression(value, operations[index + 1 :]))
    return " " + " = ".join(forms) + f". So the answer is \\boxed{{{value}}}"


def _feasible_operations(value: int, difficulty: Difficulty) -> list[tuple[str, int | None]]:
    """Operations that keep every value in [0, max_value] (operand None: drawn later)."""
    options: list[tuple[str, int | None]] = []
    if value + difficulty.operand_low <= difficulty.max_value:
        options.append(("+", None))
    if value >= difficulty.operand_low:
        options.append(("-", None))
    for symbol, factor in FACTOR_PHRASES:
        if symbol == "*" and value * factor <= difficulty.max_value:
            options.append((symbol, factor))
        if symbol == "/" and value % factor == 0 and value > 0:
            options.append((symbol, factor))
    return options


def draw_problem(rng: random.Random, difficulty: Difficulty, prompt_id: str, split: str) -> Problem:
    """Draw one problem; every intermediate value stays in [0, difficulty.max_value]."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(difficulty.start_low, difficulty.start_high)
    sentences = [f"{name} has {start} {item}."]
    operations, value = [], start
    for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
        options = _feasible_operations(value, difficulty)
        # Symbol first, then factor: doubling and tripling together are as likely as "+" alone.
        symbol = rng.choice(sorted({option[0] for option in options}))
        operand = rng.choice([option[1] for option in options if option[0] == symbol])
        if symbol == "+":
            operand = rng.randint(
                difficulty.operand_low, min(difficulty.operand_high, difficulty.max_value - value)
            )
            phrase = rng.choice(ADD_PHRASES).format(n=operand)
        elif symbol == "-":
            operand = rng.randint(difficulty.operand_low, min(difficulty.operand_high, value))
            phrase = rng.choice(SUB_PHRASES).format(n=operand)
        else:
            phrase = FACTOR_PHRASES[(symbol, operand)]
        sentences.append(f"{name} {phrase}.")
        operations.append((symbol, operand))
        value = apply_operation(value, symbol, operand)
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return Problem(
        prompt_id=prompt_id,
        split=split,
        question=question,
        answer=str(value),
        solution=model_solution(start, operations),
        expert_solution=expert_solution(start, operations),
        start=start,
        operations=operations,
    )


def _split_difficulty(split: str, rng: random.Random, base_ood_fraction: float) -> Difficulty:
    if split == "ood":
        return OUT_OF_DISTRIBUTION
    if split == "base" and rng.random() < base_ood_fraction:
        return OUT_OF_DISTRIBUTION
    return IN_DISTRIBUTION


def generate_splits(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    base_ood_fraction: float = DEFAULT_BASE_OOD_FRACTION,
) -> dict[str, list[Problem]]:
    """All five splits, deterministic in ``seed``; ``sizes`` overrides entries of DEFAULT_SIZES.

    Returns ``{split: [Problem, ...]}`` with disjoint question texts across splits.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; expected some of {SPLITS}")
    taken: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for split in _SPLIT_PRIORITY:
        # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and machines.
        rng = random.Random(f"megatron-rift-demo:{seed}:{split}")
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < sizes[split]:
            attempts += 1
            if attempts > 20 * sizes[split] + 1000:
                raise RuntimeError(f"could not draw {sizes[split]} distinct {split} problems")
            difficulty = _split_difficulty(split, rng, base_ood_fraction)
            problem = draw_problem(rng, difficulty, f"{split}-{len(problems):06d}", split)
            if problem.question not in taken:
                taken.add(problem.question)
                problems.append(problem)
        splits[split] = problems
    return {split: splits[split] for split in SPLITS}


def task_texts(problems: Iterable[Problem]) -> Iterator[str]:
    """Every text the demo's tokenizer must cover: prompts followed by each solution style."""
    for problem in problems:
        for solution in (problem.solution, problem.expert_solution):
            if solution:
                yield problem.prompt + solution


def write_problems_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as JSONL (one ``Problem.to_record()`` per line) via a temp file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(problem.to_record(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


class ProblemsFileError(ValueError):
    """A bad record in a ``--problems`` file; the message names the file and line."""


def _record_text(record: dict, field: str, where: str, required: bool) -> str | None:
    value = record.get(field)
    if value is None:
        if required:
            raise ProblemsFileError(f"{where}: missing field {field!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ProblemsFileError(
            f"{where}: field {field!r} must be a string, got {type(value).__name__}"
        )
    text = str(value)
    if required and not text.strip():
        raise ProblemsFileError(f"{where}: field {field!r} is empty")
    return text


def load_problems_file(path: str | Path) -> list[Problem]:
    """Read a user's problems JSONL: ``question``, ``answer``, ``split`` (train/val/test/ood) and an
    optional ``solution`` per line (blank lines skipped). A given solution serves both as model-style
    and expert-style text. Raises ProblemsFileError naming the file, line and field on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ProblemsFileError(f"{path}: no such problems file")
    problems: list[Problem] = []
    seen_ids: dict[str, int] = {}
    for lineno, where, record in iter_json_objects(path, ProblemsFileError):
        question = _record_text(record, "question", where, required=True)
        answer = _record_text(record, "answer", where, required=True)
        split = _record_text(record, "split", where, required=True)
        if split not in USER_SPLITS:
            raise ProblemsFileError(
                f"{where}: field 'split' is {split!r}; use one of {', '.join(USER_SPLITS)}"
            )
        solution = _record_text(record, "solution", where, required=False)
        if solution is not None and not solution.startswith((" ", "\n")):
            solution = " " + solution  # responses follow "A:" after a space, as the demo's do
        prompt_id = _record_text(record, "prompt_id", where, required=False)
        prompt_id = prompt_id or f"{split}-{lineno:06d}"
        if prompt_id in seen_ids:
            raise ProblemsFileError(
                f"{where}: prompt_id {prompt_id!r} already used on line {seen_ids[prompt_id]}"
            )
        seen_ids[prompt_id] = lineno
        problems.append(
            Problem(
                prompt_id=prompt_id,
                split=split,
                question=question,
                answer=answer.strip(),
                solution=solution,
                expert_solution=solution,
            )
        )
    if not problems:
        raise ProblemsFileError(f"{path}: no problems (the file is empty)")
    return problems
