"""The one exception type the converters raise for problems with the user's input."""


class ConversionError(Exception):
    """Bad input or a failed check, worded for the user: what was wrong, where, and what to do.

    The command-line tools print it without a traceback and exit with status 2.
    """
