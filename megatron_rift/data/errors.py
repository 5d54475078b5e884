"""The one error type of the rollout data path.

Raised for problems the user can fix (bad input record, unreadable tokenizer, missing side file).
Its message says what was wrong, where (file, line or record, field) and what to do; the
``pack_rollouts`` CLI prints it without a traceback and exits with status 2.
"""


class RolloutDataError(ValueError):
    """A user-fixable problem with rollout input, a tokenizer or a packed dataset."""
