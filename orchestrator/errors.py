"""Errors a user can fix, each rendered as one line that names the field, the value and what is allowed."""

from __future__ import annotations

MISSING = object()


class ZeromixError(Exception):
    """A problem the user can act on. The CLI prints it on one line and exits with status 2."""


class InputError(ZeromixError):
    def __init__(self, source: str, field: str, value: object, allowed: str):
        self.source, self.field, self.value, self.allowed = source, field, value, allowed
        source, field, allowed = _one_line(str(source)), _one_line(str(field)), _one_line(allowed)
        if value is MISSING:
            super().__init__(f"{source}: {field} is missing; {allowed}")
        else:
            super().__init__(f"{source}: {field}={_show(value)} is not allowed; {allowed}")


def _one_line(text: str) -> str:
    """A key or path from the user's file may hold a newline or a control character: shown escaped, so the
    message stays one line and cannot fake another."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
