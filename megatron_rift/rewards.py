"""Verifiers: a response and a reference answer in, a reward in {0, 1} out.

Verifiers are looked up by name (``get_verifier("math")``) and new ones are added with the
``@register_verifier("name")`` class decorator. Every verifier first extracts the final answer from the
response: the content of the last ``\\boxed{...}`` (braces balanced, so ``\\boxed{\\frac{1}{2}}`` works),
or, when there is no box, the last number in the text. No extractable answer means reward 0.

* ``math``: the answers are compared by ``math_verify`` (symbolic/numeric equivalence:
  ``\\frac{1}{2}`` == ``0.5``, ``1,000`` == ``1000``).
* ``exact``: normalized string equality (whitespace, ``$``, ``\\text{}``, case, trailing period);
  ``1,000`` and ``1000`` differ.
* ``integer``: both parse to the same integer (thousands separators and ``.0`` allowed).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A number, with optional thousands separators ("1,000") and decimals; the sign is kept.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance, else None."""
    best_start, best_content = -1, None
    for command in _BOX_COMMANDS:
        search_from = len(text)
        while True:
            start = text.rfind(command, 0, search_from)
            if start < 0 or start < best_start:
                break
            content = _braced_argument(text, start + len(command))
            if content is not None:
                best_start, best_content = start, content
                break
            search_from = start  # an unclosed box (e.g. a truncated response): try an earlier one
    return best_content


def _braced_argument(text: str, position: int) -> str | None:
    while position < len(text) and text[position] == " ":
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    depth = 0
    for index in range(position, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : index]
    return None


def last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def extract_final_answer(response: str) -> str | None:
    """The last boxed answer, else the last number, else None (stripped; an empty box is None)."""
    boxed = last_boxed_content(response)
    answer = boxed if boxed is not None else last_number(response)
    if answer is None or not answer.strip():
        return None
    return answer.strip()


class Verifier:
    """Base class: override :meth:`is_equivalent` (and :meth:`extract_answer` if needed)."""

    name = "base"

    def extract_answer(self, response: str) -> str | None:
        return extract_final_answer(response)

    def reference_answer(self, reference: str) -> str:
        """A reference may be given boxed; its content is what is compared."""
        reference = str(reference)
        boxed = last_boxed_content(reference)
        return (boxed if boxed is not None else reference).strip()

    def is_equivalent(self, answer: str, reference: str) -> bool:
        raise NotImplementedError

    def verify(self, response: str, reference: str) -> float:
        """1.0 when the response's final answer matches the reference answer, else 0.0."""
        answer = self.extract_answer(response)
        if answer is None:
            return 0.0
        return 1.0 if self.is_equivalent(answer, self.reference_answer(reference)) else 0.0

    def __call__(self, response: str, reference: str) -> float:
        return self.verify(response, reference)


_VERIFIERS: dict[str, type[Verifier]] = {}


def register_verifier(name: str) -> Callable[[type[Verifier]], type[Verifier]]:
    """Class decorator: make a Verifier subclass available as ``get_verifier(name)``."""

    def register(cls: type[Verifier]) -> type[Verifier]:
        if name in _VERIFIERS and _VERIFIERS[name] is not cls:
            raise ValueError(
                f"a verifier named {name!r} is already registered ({_VERIFIERS[name].__qualname__})"
            )
        cls.name = name
        _VERIFIERS[name] = cls
        return cls

    return register


def available_verifiers() -> list[str]:
    return sorted(_VERIFIERS)


def get_verifier(name: str) -> Verifier:
    if name not in _VERIFIERS:
        raise ValueError(
            f"unknown verifier {name!r}; available: {', '.join(available_verifiers())}"
        )
    return _VERIFIERS[name]()


def _strip_text_wrappers(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    match = re.fullmatch(r"\\(?:text|textbf|mathrm)\{(.*)\}", answer)
    return match.group(1).strip() if match else answer


@register_verifier("exact")
class ExactVerifier(Verifier):
    @staticmethod
    def normalize(answer: str) -> str:
        answer = _strip_text_wrappers(answer).rstrip(".").strip()
        return " ".join(answer.split()).lower()

    def is_equivalent(self, answer: str, reference: str) -> bool:
        return self.normalize(answer) == self.normalize(reference)


def parse_integer(text: str) -> int | None:
    """``"1,000"``, ``"+12"``, ``"-3"``, ``"12.0"`` -> int; anything else (``"1.5"``, ``"x"``) -> None."""
    text = _strip_text_wrappers(text).rstrip(".").replace(" ", "")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    match = re.fullmatch(r"([-+]?\d+)(?:\.0+)?", text)
    return int(match.group(1)) if match else None


@register_verifier("integer")
class IntegerVerifier(Verifier):
    def is_equivalent(self, answer: str, reference: str) -> bool:
        expected = parse_integer(reference)
        if expected is None:
            raise ValueError(
                f"integer verifier: the reference answer {reference!r} is not an "
                "integer; use the 'math' or 'exact' verifier for such answers"
            )
        return parse_integer(answer) == expected


def _signal_timeouts_usable() -> bool:
    # math_verify's timeouts use signal.alarm, which only the main thread of a process may set.
    return threading.current_thread() is threading.main_thread()


@register_verifier("math")
class MathVerifier(Verifier):
    timeout_seconds = 5

    def is_equivalent(self, answer: str, reference: str) -> bool:
        from math_verify import parse, verify

        timeout = self.timeout_seconds if _signal_timeouts_usable() else None
        gold = parse(_as_latex(reference), parsing_timeout=timeout)
        predicted = parse(_as_latex(answer), parsing_timeout=timeout)
        if not gold or not predicted:
            return False
        return bool(verify(gold, predicted, timeout_seconds=timeout))


def _as_latex(answer: str) -> str:
    # Boxing tells math_verify where the answer is; thousands separators are removed first so that
    # "1,000" is not read as the tuple (1, 000).
    answer = answer.strip()
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    return f"\\boxed{{{answer}}}"
