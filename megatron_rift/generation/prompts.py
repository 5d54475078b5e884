"""Problems to sample from, and the prompt each one is sampled with.

A problem's ``prompt`` is used verbatim; a ``question`` alone is rendered by
:func:`read_generation_problems`: with ``--prompt-template`` when given; else, when the tokenizer
has a chat template, as a conversation (``--system-prompt``, then the question as a user turn)
through that template with the assistant header appended, exactly as the pack tool renders the
conversation (:class:`~megatron_rift.data.chat.ChatFormat`); else with
:data:`DEFAULT_PROMPT_TEMPLATE`. A chat-rendered prompt already holds the template's special
tokens (BOS included) and is encoded without adding any; other prompts get the tokenizer's own
(BOS for Llama-style tokenizers), as packing a prompt/response record does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_rift.data.chat import ChatFormat
from megatron_rift.jsonl import iter_json_objects

# For a tokenizer without a chat template (a base model): the question and a line break, no
# invented "Q:/A:" framing that the model may never have seen.
DEFAULT_PROMPT_TEMPLATE = "{question}\n"


@dataclasses.dataclass
class GenerationProblem:
    prompt_id: str
    prompt: str
    answer: str
    question: str | None = None
    # The conversation ``prompt`` renders through the chat template (None: a plain prompt); the
    # rollout record's ``messages`` are these plus the sampled assistant turn.
    messages: list[dict] | None = None


class ProblemsInputError(ValueError):
    """A bad problem record; the message names the file and line."""


def load_prompt_tokenizer(folder: str | Path):
    """The HF tokenizer of ``folder`` (local files), for :func:`render_question`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises many types for a bad folder
        raise ValueError(
            f"{folder}: could not load its tokenizer ({type(error).__name__}: "
            f"{error}); pass --tokenizer, or --prompt-template to do "
            "without"
        ) from None


def chat_format(tokenizer) -> ChatFormat | None:
    """The tokenizer's :class:`ChatFormat`, or None when it has no chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    return ChatFormat(tokenizer, getattr(tokenizer, "name_or_path", "") or "the tokenizer")


def question_messages(question: str, system_prompt: str | None = None) -> list[dict]:
    """The conversation a question is asked in: an optional system turn, then a user turn."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*system, {"role": "user", "content": question}]


def render_question(
    question: str,
    tokenizer=None,
    prompt_template: str | None = None,
    system_prompt: str | None = None,
) -> str:
    """The prompt text the model is sampled from for ``question`` (see the module docstring)."""
    return _render(question, prompt_template, chat_format(tokenizer), system_prompt)[0]


def _check_system_prompt(chat: ChatFormat | None, system_prompt: str | None) -> None:
    if system_prompt is not None and chat is None:
        raise ValueError(
            "--system-prompt needs the tokenizer's chat template to place it; with "
            "--prompt-template (or a tokenizer without a template) write it into the template"
        )


def _render(question, prompt_template, chat, system_prompt) -> tuple[str, list[dict] | None]:
    if prompt_template is not None or chat is None:
        _check_system_prompt(None, system_prompt)
        return (prompt_template or DEFAULT_PROMPT_TEMPLATE).format(question=question), None
    messages = question_messages(question, system_prompt)
    return chat.render(messages, add_generation_prompt=True), messages


def read_generation_problems(
    path: str | Path,
    prompt_template: str | None = None,
    tokenizer=None,
    system_prompt: str | None = None,
) -> list[GenerationProblem]:
    """Problems JSONL -> problems. Each line needs ``prompt`` (used verbatim) or ``question``
    (rendered with ``tokenizer``'s chat template and ``system_prompt``, or ``prompt_template``),
    and ``answer``; ``prompt_id`` is optional (default: the line number)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemsInputError(f"{path}: no such problems file")
    chat = chat_format(tokenizer) if prompt_template is None else None
    _check_system_prompt(chat, system_prompt)
    problems, seen = [], {}
    for lineno, where, record in iter_json_objects(path, ProblemsInputError):
        question, prompt = record.get("question"), record.get("prompt")
        if not isinstance(prompt, str) and not isinstance(question, str):
            raise ProblemsInputError(f"{where}: needs a string field 'prompt' or 'question'")
        if record.get("answer") is None or isinstance(record["answer"], (dict, list, bool)):
            raise ProblemsInputError(
                f"{where}: needs field 'answer' (a string or number) to score the responses"
            )
        prompt_id = str(record.get("prompt_id", f"{path.stem}-{lineno:06d}"))
        if prompt_id in seen:
            raise ProblemsInputError(
                f"{where}: prompt_id {prompt_id!r} already used on line {seen[prompt_id]}"
            )
        seen[prompt_id] = lineno
        messages = None
        if not isinstance(prompt, str):
            prompt, messages = _render(question, prompt_template, chat, system_prompt)
        problems.append(
            GenerationProblem(
                prompt_id,
                prompt,
                str(record["answer"]),
                question if isinstance(question, str) else None,
                messages,
            )
        )
    if not problems:
        raise ProblemsInputError(f"{path}: no problems (the file is empty)")
    return problems
