"""Chat conversations through an HF tokenizer's own chat template, with assistant-only loss masks.

A conversation is a list of ``{"role", "content"}`` messages (roles :data:`ROLES`). Its tokens are
exactly ``tokenizer.apply_chat_template(messages)``; the loss mask covers each trained assistant
turn's content and the template's end-of-turn tokens (``<|im_end|>``, ``<|eot_id|>``), never a
header or another role's tokens, nor the text a template writes after the end-of-turn (ChatML's
line break).

Masks come from token prefixes, not string search: assistant turn ``i`` starts at
``len(tokens(render(messages[:i], add_generation_prompt=True)))`` (what generation is prompted
with) and ends where ``tokens(render(messages[:i + 1]))`` ends, minus what follows the end-of-turn.
Every such prefix must be a prefix of the whole conversation's tokens; a template that renders or
tokenizes earlier turns differently once later turns follow is refused, naming the turn. A
template with ``{% generation %}`` blocks defines its mask itself
(``return_assistant_tokens_mask``); each block must end with the end-of-turn.

The end-of-turn is found by rendering a probe turn: the template's text after the assistant's
content, up to and including its first special token. Generation stops on that token.

Main process: :class:`ChatFormat` (needs the transformers tokenizer, for jinja). Tokenizer
workers: :func:`conversation_tokens` (needs only ``encode_batch``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_rift.data.errors import RolloutDataError, check_encodable

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("last-assistant", "all-assistant")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
_PROBE_QUESTION, _PROBE_ANSWER = "Probe question?", "Probe7answer"


def parse_messages(value: object, field: str, where: object, train_on: str) -> tuple[dict, ...]:
    """Validate a record's conversation; returns its messages (keys with null values dropped).

    Needs at least one assistant turn, the last one with non-blank content; under
    ``last-assistant`` the conversation must end with it (the rewarded response).
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise RolloutDataError(
            f'{where}: field \'{field}\' must be a non-empty list of {{"role", "content"}} '
            f"objects, got {_describe(value)}."
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RolloutDataError(
                f"{where}: {field}[{i}] must be an object with 'role' and 'content', "
                f"got {_describe(message)}."
            )
        message = {k: v for k, v in message.items() if v is not None}
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RolloutDataError(
                f"{where}: {field}[{i}] has role {role!r}; use one of {', '.join(ROLES)}."
            )
        if not isinstance(content, str):
            raise RolloutDataError(
                f"{where}: {field}[{i}] ({role}) needs 'content' as a string, got "
                f"{_describe(content)}. Lists of content parts (images, audio) are not supported."
            )
        check_encodable(content, f"{where}: {field}[{i}] ({role}) content")
        messages.append(message)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise RolloutDataError(
            f"{where}: '{field}' has no assistant turn, so there is nothing to train on. "
            "Add the model's response as the last message with role 'assistant'."
        )
    if train_on == "last-assistant" and assistant[-1] != len(messages) - 1:
        raise RolloutDataError(
            f"{where}: the last message of '{field}' is a {messages[-1]['role']} turn; under "
            "--train-on last-assistant the rewarded response is the last message and must be "
            "an assistant turn. Drop the trailing turns or pass --train-on all-assistant."
        )
    if (assistant[0] if train_on == "all-assistant" else assistant[-1]) == 0:
        raise RolloutDataError(
            f"{where}: {field}[0] is a trained assistant turn with nothing before it to be "
            "predicted from; start the conversation with a system or user turn."
        )
    if not messages[assistant[-1]]["content"].strip():
        raise RolloutDataError(
            f"{where}: the last assistant turn ({field}[{assistant[-1]}]) is empty; there is "
            "nothing to train on. Remove the record or fill the turn."
        )
    return tuple(messages)


def conversation_key(messages: Sequence[dict]) -> str:
    """The conversation minus its last assistant turn, as text: the default group of a rollout."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context = list(messages[:last]) + list(messages[last + 1 :])
    return json.dumps(context, sort_keys=True, ensure_ascii=False)


def one_turn(prompt: str, response: str) -> tuple[dict, ...]:
    """A prompt/response record as a conversation (``--chat-template``)."""
    return ({"role": "user", "content": prompt}, {"role": "assistant", "content": response})


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


@dataclass(frozen=True)
class ChatPlan:
    """What a worker needs to tokenize one conversation and find its trained spans.

    Prefix method: ``text`` (the whole conversation), and per trained assistant turn (message
    index in ``turns``) ``before`` (the conversation before it plus the generation prompt) and
    ``through`` (the conversation through it; None when that is ``text``). Generation markers:
    ``ids`` and ``spans`` already computed. The last span is the rewarded response.
    """

    turns: tuple[int, ...]
    text: str = ""
    before: tuple[str, ...] = ()
    through: tuple[str | None, ...] = ()
    ids: tuple[int, ...] | None = None
    spans: tuple[tuple[int, int], ...] = ()


class ChatFormat:
    """An HF tokenizer's chat template: rendering, end-of-turn, and :class:`ChatPlan` per
    conversation. Raises :class:`RolloutDataError` when the template has no usable end-of-turn."""

    def __init__(self, hf_tokenizer, path: str):
        self._tok, self.path = hf_tokenizer, path
        self.template = hf_tokenizer.get_chat_template()
        self.sha256 = hashlib.sha256(self.template.encode("utf-8")).hexdigest()
        self.uses_generation_markers = bool(_GENERATION_BLOCK.search(self.template))
        self._compiled = self._compile()
        self.end_of_turn, self.after_end_of_turn = self._probe_end_of_turn()

    @property
    def stop_token_id(self) -> int:
        """The token generation stops on: the end-of-turn's special token."""
        return self.end_of_turn[-1]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``."""
        try:
            if self._compiled is not None:
                return self._render_compiled(self._compiled, messages, add_generation_prompt)
            return self._tok.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja's TemplateError, a template's raise_exception(...)
            raise RolloutDataError(
                f"the chat template of {self.path} cannot render this conversation "
                f"({type(exc).__name__}: {exc})."
            ) from None

    def _render_compiled(self, compiled, messages: Sequence[dict], add_generation_prompt) -> str:
        return compiled.render(
            messages=list(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._tok.special_tokens_map,
        )

    def _compile(self):
        """The template compiled in transformers' own jinja environment, rendered directly:
        apply_chat_template's message normalization costs ~0.9 ms a call under transformers 5,
        ~25x the rendering. Used only when it renders the probe conversations exactly as
        apply_chat_template does; None (apply_chat_template it is) otherwise."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
        except Exception:  # another transformers version, or a template it cannot compile
            return None
        turns = [
            {"role": "system", "content": "S"},
            {"role": "user", "content": _PROBE_QUESTION},
            {"role": "assistant", "content": _PROBE_ANSWER},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": " A2 "},
        ]
        try:
            for probe in (turns[1:2], turns[1:3], turns, turns[:4]):
                for generation_prompt in (True, False):
                    slow = self._tok.apply_chat_template(
                        probe, tokenize=False, add_generation_prompt=generation_prompt
                    )
                    if self._render_compiled(compiled, probe, generation_prompt) != slow:
                        return None
        except Exception:  # a template that refuses a probe (e.g. no system role): stay exact
            return None
        return compiled

    def _special_ids(self) -> set[int]:
        added = getattr(self._tok, "added_tokens_decoder", {}) or {}
        return set(self._tok.all_special_ids) | {i for i, t in added.items() if t.special}

    def _probe_end_of_turn(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        user = [{"role": "user", "content": _PROBE_QUESTION}]
        whole = self.render([*user, {"role": "assistant", "content": _PROBE_ANSWER}], False)
        at = whole.rfind(_PROBE_ANSWER)
        if at < 0:
            raise RolloutDataError(
                f"the chat template of {self.path} does not write an assistant turn's content "
                "(rendered a probe conversation), so its end-of-turn cannot be found."
            )
        suffix = whole[at + len(_PROBE_ANSWER) :]
        ids = self._tok(suffix, add_special_tokens=False)["input_ids"]
        special = self._special_ids()
        end = next((k + 1 for k, token in enumerate(ids) if token in special), None)
        if end is None:
            raise RolloutDataError(
                f"the chat template of {self.path} ends an assistant turn with {suffix!r}, which "
                "holds no special token: generation could not stop there and a trained model "
                "would not learn to. Use a template whose assistant turns end with an "
                "end-of-turn token (e.g. <|im_end|>, <|eot_id|>, or eos_token)."
            )
        return tuple(ids[:end]), tuple(ids[end:])

    def info(self, train_on: str) -> dict:
        """JSON-ready description, stored in the packed dataset's ``PREFIX.json``."""
        decode = self._tok.decode
        return {
            "sha256": self.sha256,
            "end_of_turn": decode(list(self.end_of_turn)),
            "end_of_turn_ids": list(self.end_of_turn),
            "after_end_of_turn": decode(list(self.after_end_of_turn)),
            "mask": "generation-markers" if self.uses_generation_markers else "prefixes",
            "train_on": train_on,
        }

    def worker_spec(self) -> tuple:
        """(end-of-turn ids, ids after it, its text): what :func:`conversation_tokens` checks."""
        return (
            self.end_of_turn,
            self.after_end_of_turn,
            self._tok.decode(list(self.end_of_turn)),
        )

    def plan(self, messages: Sequence[dict], train_on: str) -> ChatPlan:
        """The texts (or, with generation markers, the ids and spans) of one conversation."""
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = tuple(assistant if train_on == "all-assistant" else assistant[-1:])
        if self.uses_generation_markers:
            return self._marker_plan(messages, assistant, turns)
        last = len(messages) - 1
        return ChatPlan(
            turns=turns,
            text=self.render(messages, False),
            before=tuple(self.render(messages[:i], True) for i in turns),
            through=tuple(
                None if i == last else self.render(messages[: i + 1], False) for i in turns
            ),
        )

    def _marker_plan(self, messages, assistant: list[int], turns: tuple[int, ...]) -> ChatPlan:
        self.render(messages, False)  # a template error reads like the prefix method's
        out = self._tok.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        runs, start = [], None
        for k, bit in enumerate([*mask, 0]):
            if bit and start is None:
                start = k
            elif not bit and start is not None:
                runs.append((start, k))
                start = None
        if len(runs) != len(assistant):
            raise RolloutDataError(
                f"the chat template's {{% generation %}} blocks mark {len(runs)} spans in a "
                f"conversation with {len(assistant)} assistant turns; each assistant turn needs "
                "exactly one block."
            )
        by_turn = dict(zip(assistant, runs))
        return ChatPlan(turns=turns, ids=tuple(ids), spans=tuple(by_turn[i] for i in turns))


# --- worker side ---------------------------------------------------------------------------
def conversation_tokens(encoder, plans: Sequence[ChatPlan], spec: tuple) -> list:
    """Tokenize conversations; per plan ``(ids, spans)`` or an error message (str) naming the
    turn. ``spec`` is :meth:`ChatFormat.worker_spec`."""
    texts = []
    for plan in plans:
        if plan.ids is None:
            texts += [plan.text, *plan.before, *(t for t in plan.through if t is not None)]
    encoded = iter(encoder.encode_batch(texts, add_special_tokens=False) if texts else ())
    results = []
    for plan in plans:
        if plan.ids is not None:
            results.append(_marker_spans(plan, spec))
            continue
        ids = next(encoded)
        before = [next(encoded) for _ in plan.before]
        through = [ids if t is None else next(encoded) for t in plan.through]
        results.append(_prefix_spans(plan, ids, before, through, spec))
    return results


def _prefix_spans(plan: ChatPlan, ids, befores, throughs, spec):
    end_of_turn, after, eot_text = spec
    eot, tail = list(end_of_turn), list(after)
    spans = []
    for turn, before, through in zip(plan.turns, befores, throughs):
        where = f"messages[{turn}] (assistant)"
        for name, prefix in (("before", before), ("through", through)):
            if ids[: len(prefix)] != prefix:
                return (
                    f"{where}: the conversation {name} this turn tokenizes to {len(prefix)} "
                    "tokens that are not a prefix of the whole conversation's tokens: the chat "
                    "template renders or tokenizes earlier turns differently once later turns "
                    "follow, so the turn's tokens cannot be located. Fix the template, or pack "
                    "with --train-on last-assistant."
                )
        end = len(through) - len(tail)
        if through[end - len(eot) : end] != eot or through[end:] != tail:
            return (
                f"{where}: the turn does not end with the template's end-of-turn {eot_text!r} "
                "(its content may contain text the template treats specially)."
            )
        if end - len(eot) < len(before):
            return f"{where}: the template writes the turn's end-of-turn before its content."
        spans.append((len(before), end))
    return ids, spans


def _marker_spans(plan: ChatPlan, spec):
    eot, _, eot_text = spec
    ids = list(plan.ids)
    for turn, (start, end) in zip(plan.turns, plan.spans):
        if tuple(ids[max(start, end - len(eot)) : end]) != tuple(eot):
            return (
                f"messages[{turn}] (assistant): the template's {{% generation %}} block does not "
                f"end with its end-of-turn {eot_text!r}, so a model trained on it would not learn "
                "to stop. Put the end-of-turn inside the block."
            )
    return ids, list(plan.spans)
