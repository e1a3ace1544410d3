"""Text and values a client sent, made safe to store and to echo back.

JSON may carry what UTF-8 cannot: a lone UTF-16 surrogate (`"\\ud800"`) decodes to a Python str that no
encoder, tokenizer or Redis client accepts, and Python's json module reads `NaN` and `Infinity` literals
that strict JSON encoders refuse to write. Request bodies are validated with `Text` (a 422 naming the
field), error responses echo input through `json_safe` (truncated, escaped), and text read back from the
store goes through `clean_text` (so that state written before these checks cannot break a later request).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator

MAX_ECHO_CHARS = 200
"""A string echoed in an error response keeps this many characters (then says how long it was)."""

MAX_ECHO_ITEMS = 10
"""A list or object echoed in an error response keeps this many items."""

MAX_ECHO_DEPTH = 4
"""Nesting kept in an echo; deeper values are replaced by a marker."""

MAX_INT_DIGITS = 30
"""Integers with more digits are echoed as a truncated string."""


def unencodable_at(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _valid_unicode(text: str) -> str:
    at = unencodable_at(text)
    if at is not None:
        code = f"U+{ord(text[at]):04X}"
        raise ValueError(f"the text holds a lone UTF-16 surrogate ({code}) at character {at}: send valid Unicode "
                         "(a surrogate must be half of a pair)")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A request string: any Unicode text UTF-8 can encode (a lone surrogate is a 422)."""


def clean_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (for text stored before it was validated)."""
    if unencodable_at(text) is None:
        return text
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def _safe_str(text: str, max_chars: int) -> str:
    if len(text) > max_chars:
        text = f"{text[:max_chars]}... ({len(text)} characters in all)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(value: Any, max_chars: int = MAX_ECHO_CHARS, _depth: int = 0) -> Any:
    """`value` as something any strict JSON encoder writes, and small: strings truncated to `max_chars`
    with lone surrogates escaped as text, NaN and infinities as strings, long lists and objects cut to their
    first items, deep nesting cut, anything else by its str()."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _safe_str(value, max_chars)
    if isinstance(value, int):
        if abs(value) < 10**MAX_INT_DIGITS:
            return value
        return f"an integer of more than {MAX_INT_DIGITS} digits"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, bytes):
        return _safe_str(value.decode("utf-8", "replace"), max_chars)
    if _depth >= MAX_ECHO_DEPTH:
        return "..."
    if isinstance(value, dict):
        items = list(value.items())
        out = {_safe_str(str(k), max_chars): json_safe(v, max_chars, _depth + 1) for k, v in items[:MAX_ECHO_ITEMS]}
        if len(items) > MAX_ECHO_ITEMS:
            out["..."] = f"{len(items) - MAX_ECHO_ITEMS} more keys"
        return out
    if isinstance(value, list | tuple | set | frozenset):
        seq = list(value)
        out_list = [json_safe(v, max_chars, _depth + 1) for v in seq[:MAX_ECHO_ITEMS]]
        if len(seq) > MAX_ECHO_ITEMS:
            out_list.append(f"... {len(seq) - MAX_ECHO_ITEMS} more items")
        return out_list
    return _safe_str(str(value), max_chars)
