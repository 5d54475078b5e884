"""Reading JSON-lines files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_json_objects(
    path: str | Path, error: type[Exception] = ValueError
) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(line_number, "FILE:LINE", record)`` for each non-blank line of a JSONL file.

    Raises ``error("FILE:LINE: ...")`` on a line that is not valid JSON or not a JSON object, so
    each caller reports bad input with its own exception type.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield lineno, where, record
