"""XML 1.0 text of polars String columns, as polars expressions: XML request bodies are built without a Python
object per value (the XML counterpart of :mod:`sync.platforms._encode`).

:func:`text` gives, for every string ``s``, exactly ``xml.sax.saxutils.escape(s, {"\\r": "&#13;"})`` — ``&``,
``<`` and ``>`` as entities, a carriage return as a character reference (or every XML parser would read
``"\\r\\n"`` back as ``"\\n"``: end-of-line normalisation). :func:`unsafe` finds the values XML 1.0 cannot carry
at all (C0 controls other than tab, line feed and carriage return; U+FFFE, U+FFFF — no escape helps, ``&#7;`` is
not well-formed either): such a value is a rejected row, never an escaped one. The property tests in
``tests/platforms/test_xml_encode.py`` hold both equalities for arbitrary strings.
"""

from __future__ import annotations

import polars as pl

__all__ = ["UNSAFE_PATTERN", "element", "text", "unsafe"]

UNSAFE_PATTERN = "[\\x00-\\x08\\x0B\\x0C\\x0E-\\x1F\\x{FFFE}\\x{FFFF}]"
"""The characters XML 1.0 cannot carry, as a polars (Rust) regex; valid UTF-8, hence a polars string, holds no
surrogates (which Python's check also refuses)."""

# saxutils.escape replaces "&" first and the others after; no replacement makes text another one matches, so
# one simultaneous pass (replace_many) gives the same result.
_SPECIAL = ["&", "<", ">", "\r"]
_ESCAPED = ["&amp;", "&lt;", "&gt;", "&#13;"]


def text(expr: pl.Expr) -> pl.Expr:
    """The XML character data of each value of a String expression (null stays null)."""
    return expr.str.replace_many(_SPECIAL, _ESCAPED)


def unsafe(expr: pl.Expr) -> pl.Expr:
    """True where a value holds a character XML 1.0 cannot carry (null: False)."""
    return expr.str.contains(UNSAFE_PATTERN).fill_null(False)


def element(name: str, content: pl.Expr) -> pl.Expr:
    """``<name>content</name>`` of an expression of XML text (null content: null, an element left out)."""
    return pl.concat_str(pl.lit(f"<{name}>"), content, pl.lit(f"</{name}>"))
