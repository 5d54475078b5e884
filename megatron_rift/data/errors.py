"""The one error type of the rollout data path.

Raised for problems the user can fix (bad input record, unreadable tokenizer, missing side file).
Its message says what was wrong, where (file, line or record, field) and what to do; the
``pack_rollouts`` CLI prints it without a traceback and exits with status 2.
"""


class RolloutDataError(ValueError):
    """A user-fixable problem with rollout input, a tokenizer or a packed dataset."""


def check_encodable(text: str, what: str) -> None:
    """Refuse text no tokenizer can encode: a JSON escape like "\\ud800" decodes to an unpaired
    UTF-16 surrogate, which crashed the tokenizer (found by tests/test_fuzz_data.py)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end].encode("unicode_escape").decode()
        raise RolloutDataError(
            f"{what} holds {bad} at character {err.start}, an unpaired UTF-16 surrogate that is "
            "not valid Unicode and cannot be tokenized. Fix the text (a cut emoji?) or drop the "
            "record."
        ) from None
