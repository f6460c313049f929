"""What is wrong with a CSV file pyarrow cannot read, said in the user's terms (:mod:`sync.sources.reading`).

Two diagnoses, each on the error path only:

* :func:`compressed` — a file whose first bytes are a compressed stream or an archive (gzip, zstd, bzip2, xz, zip)
  or a Parquet file: pyarrow would report "cannot decode as utf-8" at some row, or "no line of text";
* :func:`oversized_record` — a record larger than a CSV block (pyarrow's "straddling object"): where it starts
  (data row and line) and whether it is a quote that is never closed or a huge field.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sync.config import Source
from sync.errors import BadInputError

__all__ = ["compressed", "has_oversized_record", "oversized_record"]

_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it first (gunzip)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", "decompress it first (unzstd)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it first (unxz)"),
    (b"PK\x03\x04", "a zip archive", "unzip it and point the source at the CSV file inside"),
    (b"PAR1", "a Parquet file", "set the source's 'format: parquet'"),
)
"""Leading bytes → what the file is, and what to do. (A Parquet file also ends with ``PAR1``: a CSV header may
start with those four letters, so both ends are read.)"""

_BZIP2_BLOCK = b"1AY&SY"
"""The first block's magic of a bzip2 stream, after ``BZh`` and the block size digit: ``BZh`` alone starts text."""

_DECOMPRESSED_BY_NAME = (".gz", ".bz2", ".zst", ".lz4")
"""Names pyarrow's CSV reader decompresses by themselves (``pyarrow.Codec.detect``): such a file is read."""


def compressed(path: Path) -> BadInputError | None:
    """The error for a CSV source's file that is compressed (or Parquet), by its first bytes; None otherwise.

    Not read as CSV (it would fail as undecodable text, naming a row of binary data, or pass as garbage):
    the message says what the file is and what to do. Compressed CSV is not read by pushsync: polars' CSV
    scan cannot stream a compressed file (it decompresses the whole file in memory), and pyarrow's stream
    reader, which reads ours, knows no zip or xz.
    """
    if path.name.lower().endswith(_DECOMPRESSED_BY_NAME):
        return None
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
            if head.startswith(b"PAR1"):
                fh.seek(-4, 2)
                if fh.read(4) != b"PAR1":
                    return None
    except OSError:
        return None  # the reading says what is wrong
    found = next(((what, fix) for magic, what, fix in _MAGIC if head.startswith(magic)), None)
    if found is None and head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == _BZIP2_BLOCK:
        found = ("a bzip2-compressed file", "decompress it first (bunzip2)")
    if found is None:
        return None
    what, fix = found
    return BadInputError(str(path), f"{path.name} is {what}, not CSV text: {fix}")


_QUOTE = '"'


def oversized_record(source: Source, path: Path, names: list[str] | None, block_bytes: int) -> BadInputError:
    """The error for a CSV file with a record pyarrow could not fit in a block of ``block_bytes``: where the first
    such record starts (data row and line, and the column), and whether a quote opened there is never closed (the
    usual cause: the rest of the file reads as one value) or a field is that large.

    Finds the record by reading the file again with Python's CSV reader (the same quoting rules), with a field
    size limit of one block so that a never-closed quote is not read to the end of the file: on this error path
    only, at about a million short rows a second. ``names``: the header's column names, if known.
    """
    size = f"{block_bytes >> 20} MiB" if block_bytes >= 1 << 20 else f"{block_bytes} bytes"
    refused = "the whole file is refused: nothing of it is sent"
    found = _find_oversized(source, path, block_bytes)
    if found is None:
        return BadInputError(
            str(path),
            f"a record is larger than {size}: a huge field, or a quote that is never closed; {refused}",
        )
    row, line, first, header = found
    names = names if names is not None else header
    column: str | None = None
    if len(first) > block_bytes:
        # One line longer than a block: a huge field (or binary data), not a quoting problem.
        column = _name(names, _scan(first[:block_bytes], source.delimiter)[0])
        message = (
            f"the record starting on line {line} is larger than {size} on that one line: a field this large is "
            f"no CRM value (binary data? a file pasted into a cell?); {refused}"
        )
    else:
        opened = _scan(first, source.delimiter)[1]
        if opened is None:
            message = (
                f"the record starting on line {line} is larger than {size}: a huge field, or a quote that is "
                f"never closed; {refused}"
            )
        else:
            column = _name(names, opened)
            message = (
                f"a quote opened on line {line} is never closed: the lines after it read as one value, larger "
                f"than {size}. Once quoting is off no later row can be trusted, so {refused}. Close the quote "
                '(or double it, "", inside a quoted value)'
            )
    # Row 0 is the header itself.
    return BadInputError(str(path), message, row=row or None, column=column)


def has_oversized_record(source: Source, path: Path, block_bytes: int) -> bool:
    """Whether ``path`` holds a record larger than ``block_bytes`` (read as :func:`oversized_record` reads it: to
    that record, or to the end of the file when there is none)."""
    return _find_oversized(source, path, block_bytes) is not None


def _find_oversized(
    source: Source, path: Path, block_bytes: int
) -> tuple[int, int, str, list[str] | None] | None:
    """``(data row, line, its first line cut after block_bytes + 1 characters, the header's names)`` of the
    first record of ``path`` larger than ``block_bytes``, or None (unreadable, or no such record)."""
    previous = csv.field_size_limit()
    try:
        # Process-wide: a field past a block stops the reading there (csv.Error), not at the end of the file.
        csv.field_size_limit(block_bytes)
        with path.open(encoding=source.encoding, errors="replace", newline="") as fh:
            reader = csv.reader(fh, delimiter=source.delimiter)
            records, end = 0, 0  # records read (the header first), the line the last one ended on
            header: list[str] | None = None
            try:
                for record in reader:
                    if record:  # a blank line is no record (nor is it for pyarrow)
                        if sum(map(len, record)) + len(record) > block_bytes:
                            break
                        if header is None:
                            header = [name.removeprefix("\ufeff") for name in record]
                        records += 1
                    end = reader.line_num
                else:
                    return None
            except csv.Error:
                pass
        # The record starts on the first line after ``end`` that is not blank: read it again, raw.
        with path.open(encoding=source.encoding, errors="replace", newline="") as fh:
            line = 0
            while line < end:
                text = fh.readline(block_bytes + 1)
                if not text:
                    return None
                if text.endswith(("\n", "\r")):
                    line += 1
            first = fh.readline(block_bytes + 1)
            line += 1
            while first and not first.strip("\r\n"):
                first = fh.readline(block_bytes + 1)
                line += 1
    except (OSError, UnicodeError, LookupError):
        return None
    finally:
        csv.field_size_limit(previous)
    return records, line, first, header


def _name(names: list[str] | None, index: int | None) -> str | None:
    return names[index] if names is not None and index is not None and 0 <= index < len(names) else None


def _scan(text: str, delimiter: str) -> tuple[int, int | None]:
    """``(delimiters outside quotes, the field whose quote is open at the end or None)`` of ``text``: the CSV
    quoting pyarrow and Python's reader follow — a quote opens a quoted value only at a field's start, ``""``
    inside one is a quote."""
    field, opened, start, i, n = 0, None, True, 0, len(text)
    while i < n:
        c = text[i]
        if opened is not None:
            if c == _QUOTE:
                if i + 1 < n and text[i + 1] == _QUOTE:
                    i += 2
                    continue
                opened = None
        elif c == delimiter:
            field += 1
            start = True
            i += 1
            continue
        elif c == _QUOTE and start:
            opened = field
        start = False
        i += 1
    return field, opened
