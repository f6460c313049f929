"""Text rules of Python's own string handling, as polars (Rust) regex pieces: where a platform module's Python
code and a polars expression must agree on which characters are whitespace."""

from __future__ import annotations

__all__ = ["PY_WHITESPACE"]

PY_WHITESPACE = (
    "\\t\\n\\x0B\\x0C\\r\\x1C-\\x1F \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}"
)
"""The characters Python's ``\\s`` (and ``str.isspace``/``str.strip``) treat as whitespace, for use inside a
regex character class (``[...]``). Rust's ``\\s`` differs: it leaves out U+001C..U+001F, which Python counts."""
