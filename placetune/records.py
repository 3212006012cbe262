"""Typed records at file boundaries (pydantic): one-line messages when a file does not match its record."""

from __future__ import annotations

from pydantic import ValidationError


def one_line_error(exc: ValidationError) -> str:
    """The first problem pydantic found, as `where: what` in user terms, plus how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(f"#{p + 1}" if isinstance(p, int) else str(p) for p in first["loc"]
                     if not str(p).startswith("function-after"))
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{message}{more}"
