"""A job file's YAML, read so that nothing in it is silently lost or blown up.

* A key given twice in one mapping is refused (PyYAML keeps the last and drops the first without a word), naming
  the key and both lines. Merge keys (``<<: *base``) still override what they merge, as YAML means them to.
* A key is the text written: every key of a job file is a name (a column, an attribute, an endpoint, a category),
  and YAML 1.1 would turn ``on:``/``NO:`` into true/false, ``010:`` into 8 and ``1:30:`` into 90, so a column
  called ``on`` was looked for as ``True`` (and ``on:`` beside ``yes:`` was a duplicate key).
* Anchors and aliases are allowed, but the document they expand to is bounded: :data:`MAX_VALUES` values, counted
  without expanding anything (a "billion laughs" file of nine levels would otherwise hang validation, and seven
  levels print 34 MB of error messages). A document that refers to itself is refused the same way; one that
  large as written, without aliases, is refused saying so.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from sync.errors import BadJobError, JobProblem

__all__ = ["MAX_VALUES", "TooLargeError", "expanded_size", "load_yaml", "looks_like_a_key", "read_job_yaml"]

MAX_VALUES = 100_000
"""Most values (mappings, lists, scalars, keys included) a job file may expand to; a real one holds hundreds."""

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]{16,}")


def looks_like_a_key(text: str) -> bool:
    """Whether ``text`` holds a run of 16+ letters and digits mixing both: the shape of a random key or token,
    not of a name a person chose (``NETMERA_API_KEY``, ``netmera_key_prod_2``, ``secrets/netmera.key``)."""
    return any(re.search(r"[0-9]", run) and re.search(r"[A-Za-z]", run) for run in _ALNUM_RUN.findall(text))


class TooLargeError(ValueError):
    """The document expands (through aliases) to more than :data:`MAX_VALUES` values."""


class _NoDuplicateKeys(yaml.constructor.SafeConstructor):
    """A safe constructor that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key_node, _value in node.value:
            # A plain (unquoted) key is read as the text written, not as YAML 1.1's bool, number, date or null.
            # Plain style is None from PyYAML's parser, "" from libyaml's.
            if isinstance(key_node, yaml.ScalarNode) and not key_node.style and key_node.tag != _MERGE_TAG:
                key_node.tag = _STR_TAG
        first_line: dict[Hashable, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # merged keys may be overridden; complex keys are refused by the schema anyway
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                # The name of a key is shown, unless it has the shape of a key someone pasted in by mistake.
                shown = "a key" if looks_like_a_key(str(key)) else f"key {str(key)!r}"
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate {shown} (first at line {first_line[key]}): the second would silently replace "
                    "the first; keep one",
                    key_node.start_mark,
                )
            first_line[key] = line
        constructed: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return constructed


class _JobLoader(_NoDuplicateKeys, yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML's own parser, in Python."""


_FastJobLoader: type[Any] | None = None
if getattr(yaml, "__with_libyaml__", False):

    class _FastJobLoader(_NoDuplicateKeys, yaml.CSafeLoader):  # type: ignore[no-redef]
        """:class:`_JobLoader` with libyaml's parser (C): the same constructor and resolver over the same events,
        a job file parsed in 0.6–2 ms instead of 3.5–6 ms (the 0.9 KB bench job) or 6–13 ms (jobs/example.yaml,
        2 KB) of CPU on the way to a run's first request (issue 13)."""


def expanded_size(doc: Any, limit: int = MAX_VALUES) -> int:
    """Values in ``doc`` as if every alias were written out, counted up to ``limit`` + 1 at most (so a
    self-referring or exponentially aliased document costs no more than ``limit`` steps)."""
    count = 0
    stack = [doc]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def _aliased(doc: Any) -> bool:
    """Whether a mapping or list of ``doc`` is reached twice: an alias (PyYAML builds one object per anchor).
    Each is visited once, so a document of aliases costs what it holds as written, not as expanded."""
    seen: set[int] = set()
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, Mapping | list):
            if id(value) in seen:
                return True
            seen.add(id(value))
            stack.extend(value.values() if isinstance(value, Mapping) else value)
    return False


def _parse(text: str) -> Any:
    """``text`` parsed by libyaml when PyYAML has it, else — and whenever libyaml finds a fault — by PyYAML's
    parser: a faulty file gets the words and the place PyYAML gives (libyaml words faults its own way), and a
    file only one of them would refuse gets PyYAML's verdict, as before libyaml was used. Both are safe loaders
    (plain data only) with the same duplicate-key check."""
    if _FastJobLoader is not None:
        try:
            return yaml.load(text, Loader=_FastJobLoader)
        except yaml.YAMLError:
            pass
    return yaml.load(text, Loader=_JobLoader)


def load_yaml(text: str) -> Any:
    """Parse a job file's text. Raises ``yaml.YAMLError`` (a duplicate key is a ``ConstructorError`` with its
    line) and :class:`TooLargeError` when aliases expand it past :data:`MAX_VALUES` values."""
    doc = _parse(text)
    if expanded_size(doc) > MAX_VALUES:
        if not _aliased(doc):
            # Large as written: "through YAML aliases" sent the reader looking for aliases the file does not have.
            raise TooLargeError(
                f"the file holds more than {MAX_VALUES:,} values; a job file is small (hundreds): is it the "
                "job file, or is a list or a mapping in it meant for an input file?"
            )
        raise TooLargeError(
            f"the file expands to more than {MAX_VALUES:,} values through YAML aliases (or an alias that "
            "contains itself); a job file is small: write it without such aliases"
        )
    return doc


def read_job_yaml(path: Path) -> Any:
    """Read and parse a job file (any kind: sync or Meiro); every failure is one :class:`BadJobError` problem
    with the line and column where they apply — PyYAML's problem only, never its quote of the offending line,
    which may hold a value that belongs nowhere near a message."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadJobError(str(path), [JobProblem("", f"cannot read job file: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise BadJobError(str(path), [JobProblem("", "job file is not UTF-8 text")]) from exc
    try:
        return load_yaml(text)
    except TooLargeError as exc:
        raise BadJobError(str(path), [JobProblem("", str(exc))]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or "not valid YAML")
        raise BadJobError(str(path), [JobProblem(where, _what_to_do(problem))]) from exc


def _what_to_do(problem: str) -> str:
    """PyYAML's ``problem`` with what to do about it, where its words alone leave a newcomer guessing: a second
    document (``but found another document``) and a tab (``found character '\t' that cannot start any token``)."""
    if problem == "but found another document":
        return (
            "a job file is one YAML document, and a '---' line here starts another: remove it, or write a second "
            "job file"
        )
    if "'\\t'" in problem:
        return f"{problem}: indent with spaces, YAML does not allow tabs there"
    return problem
