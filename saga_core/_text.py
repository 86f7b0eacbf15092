"""What text the library stores and sends: ``str``, encodable as UTF-8. Pure.

Database columns and broker keys, topics and headers hold UTF-8. A ``str`` with a lone
surrogate (``"\\ud800"``, which ``os.fsdecode`` or a JSON decoder can produce) is not, and
PostgreSQL's text holds no NUL character: the database refuses the whole transaction holding
such text, a broker the message on every retry. Checked
where the text enters (an event, a saga's id, a saga class), so the error names it there.
"""

from __future__ import annotations


def text_problem(value: object, *, nul_ok: bool = False) -> str | None:
    """Why ``value`` cannot be stored as text (``None`` or a valid str: ``None``).

    ``nul_ok``: the text is stored inside JSON (which escapes a NUL), not as a column.
    """
    if value is None or (
        type(value) is str and value.isascii() and (nul_ok or "\x00" not in value)
    ):
        return None  # the common case, checked in nanoseconds
    if not isinstance(value, str):
        return f"must be a str, got {type(value).__name__}"
    shown = repr(value) if len(value) <= 80 else f"{value[:77]!r}..."
    if not nul_ok and "\x00" in value:  # PostgreSQL's text cannot hold it (SQLite's can)
        return f"contains a NUL character: {shown}"
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text ({exc.reason}): {shown}"
    return None
