"""Text rules of Python's own string handling, as polars (Rust) regex pieces: where a platform module's Python
code and a polars expression must agree on which characters are whitespace."""

from __future__ import annotations

__all__ = ["PY_SPACE_CHARS", "PY_WHITESPACE"]

PY_WHITESPACE = (
    "\\t\\n\\x0B\\x0C\\r\\x1C-\\x1F \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}"
)
"""The characters Python's ``\\s`` (and ``str.isspace``/``str.strip``) treat as whitespace, for use inside a
regex character class (``[...]``). Rust's ``\\s`` differs: it leaves out U+001C..U+001F, which Python counts."""

PY_SPACE_CHARS = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
"""The same characters themselves, for the polars calls that take characters rather than a regex
(``str.strip_chars``, ``str.replace_many``): ``text.str.strip_chars(PY_SPACE_CHARS)`` is Python's ``str.strip()``."""
