"""The one error type of the converter, and how it lists keys."""

from __future__ import annotations

from collections.abc import Iterable

MAX_KEYS_SHOWN = 20  # enough to see the pattern, short enough to read in a terminal


class ConversionError(ValueError):
    """Bad input to the converter: the message names the value and the fix."""


def format_keys(keys: Iterable[str], limit: int = MAX_KEYS_SHOWN) -> str:
    """``"N keys: a, b, ... (and M more)"`` with at most ``limit`` keys shown, sorted."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    noun = "key" if len(keys) == 1 else "keys"
    return f"{len(keys)} {noun}: {shown}{more}"
