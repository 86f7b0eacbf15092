"""What text the library stores and sends: ``str``, encodable as UTF-8. Pure.

Database columns and broker keys, topics and headers hold UTF-8. A ``str`` with a lone
surrogate (``"\\ud800"``, which ``os.fsdecode`` or a JSON decoder can produce) is not: the
database refuses the whole transaction holding it, a broker the message on every retry. Checked
where the text enters (an event, a saga's id, a saga class), so the error names it there.
"""

from __future__ import annotations


def text_problem(value: object) -> str | None:
    """Why ``value`` cannot be stored as text (``None`` or a valid str: ``None``)."""
    if value is None or (type(value) is str and value.isascii()):
        return None  # the common case, checked in nanoseconds
    if not isinstance(value, str):
        return f"must be a str, got {type(value).__name__}"
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text ({exc.reason}): {value!r}"
    return None
