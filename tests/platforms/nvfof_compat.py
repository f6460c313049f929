"""Inputs for the batch-ID compatibility tests of the NotifyVisitors and Forms On Fire builders
(tests/platforms/test_nvfof_batches.py).

Deterministic (seeded) CSV files and jobs covering what the packing and the body encoding must get right:

* NotifyVisitors: users with every value kind the builder formats (E.164 numbers typed with spaces, dashes and a
  ``00`` prefix, invalid numbers, dates in the job's zone, opt-in flags, lists, integral, tiny and huge numbers,
  strings of 1000+ characters, unicode and JSON's special characters), a second users source whose
  ``birth_date`` and ``email_opt_in`` are text (the lenient parsing path), events whose users have runs longer
  than a request (``after`` chains), event names of 50+ characters, ``event_time`` in two formats and zones;
* Forms On Fire: pushes with constants and per-row overrides, duplicate IDs (the last row wins), XML's special
  characters and carriage returns, characters XML 1.0 cannot carry (rejected rows in XML mode), a ``Body``
  column typed as a number.

A small batch size and small hash buckets make batches continue from one frame into the next. A Forms On Fire
batch ID includes the input file's path (two identical pushes from two rows are two messages), so the inputs are
written to one fixed directory (:func:`compat_dir`).

``fingerprints`` is what the recorded file (``tests/fixtures/nvfof_batch_ids.json``) holds: per batch, its ID,
endpoint, phase, IDs, ``after``, the rows of its items and its row keys — and for Forms On Fire in XML mode the
digest of the request as sent (credentials included). The file was written by the builders *before* the
columnar rewrite (issue 13), so the test proves that a run planned by the older version keeps its batch IDs.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

from sync.records import Batch

BATCH_SIZE = 7
ROWS_PER_BUCKET = 40
COMPANY_ID = 42
INTEGRATION_KEY = "k&y<1>\r"
"""A key with XML's special characters: the XML request escapes it like any value."""

_WORDS = ["Ada", "Ünal", "李", "😀 emoji", 'say "hi"', "a\\b", "tab\there", "line\u2028sep", "del\x7f", "é"]
_XML_WORDS = ["Tom & Jerry", "<b>bold</b>", "cr\rlf", "crlf\r\nend", "a > b", "'quoted'", '"dq"', "€", "]]>"]
# 2**53: an integral float the encoder writes in repr form. (The recorded batch IDs were made with the literal
# 9007199254740993, which reads as the same float; validation now refuses that literal: it loses precision.)
_NUMBERS = ["1", "2.5", "-0", "0.00001", "1.5e-7", "123456789.125", "1e16", "9007199254740992", "-3", "0.1"]
_MOBILES = [
    "+919899999999",
    "+91 98999-99999",
    "0091 (989) 999.9999",
    "98999",
    "+0123456789",
    "+1 555 0100 12",
]
_DATES = [
    "1989-10-14",
    "2001-01-01T10:30:00+03:00",
    "1970-01-01",
    "2024-03-10T02:30:00",
    "2024-12-31T23:59:59Z",
]

NV_JOB = """\
version: 1
name: nv-compat
workdir: work
destination:
  platform: notifyvisitors
  base_url: http://127.0.0.1:9/api/v1/
  secret: {{env: NV_COMPAT_KEY}}
  extra: {{brand_id: "1000"{extra}}}
dispatch:
  batch_size: {{"*": {size}}}
defaults:
  ext_id: id
validation:
  timezone: Asia/Kolkata
sources:
  - name: users
    path: users.csv
    attributes:
      name: string
      score: number
      born: {{attribute: birth_date, type: date}}
      joined: {{type: date}}
      member: {{type: boolean}}
      likes: {{type: list, delimiter: ";"}}
      city: string
    email: email
    msisdn: phone
    opt_ins:
      email: mail
      sms: sms
  - name: legacy
    path: legacy.csv
    attributes:
      bday: {{attribute: birth_date}}
      optin: {{attribute: email_opt_in}}
      age: number
  - name: events
    kind: events
    path: events.csv
    event: event
    attributes:
      amount: number
      sku: string
      when: {{attribute: event_time, type: date}}
      seen: {{type: date}}
      gift: {{type: boolean}}
"""

FOF_JOB = """\
version: 1
name: fof-compat
workdir: work
destination:
  platform: formsonfire
  base_url: http://127.0.0.1:9/api/v2/
  secret: {{env: FOF_COMPAT_KEY}}
  extra:
    company_id: "{company}"
    body_format: {body_format}
    user_key: {user_key}
{constants}defaults:
  ext_id: id
sources:
  - name: pushes
    path: pushes.csv
    attributes:
      title: {{attribute: Title}}
      message: {{attribute: Body{body_type}}}
      sound: {{attribute: Sound, type: boolean}}
      expiry: {{attribute: ExpirySecs, type: number}}
"""
FOF_CONSTANTS = '    title: "Hello & <welcome>"\n    body: "Default\\r\\nbody"\n    sound: "true"\n    expiry_secs: "3600"\n'

NV_VARIANTS = {
    "nv_default": "",
    "nv_alt": ', event_time_format: "yyyy-MM-ddTHH:mm:ss", event_time_zone: America/New_York, '
    'events_after_users: "false"',
}
FOF_VARIANTS = {
    "fof_json": {"body_format": "json", "user_key": "UserEmail", "constants": FOF_CONSTANTS, "body_type": ""},
    "fof_xml": {
        "body_format": "xml",
        "user_key": "UserExternalId",
        "constants": FOF_CONSTANTS,
        "body_type": "",
    },
    "fof_plain": {"body_format": "xml", "user_key": "UserId", "constants": "", "body_type": ", type: number"},
}


def compat_dir(variant: str) -> Path:
    """The fixed, emptied directory the inputs of ``variant`` are written to (the recorded IDs depend on it)."""
    directory = Path("/tmp/pushsync-nvfof-compat") / variant
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _csv_cell(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _pick(rng: random.Random, values: list[str], empty: float = 0.3) -> str:
    return "" if rng.random() < empty else rng.choice(values)


def _write(path: Path, header: str, rows: Iterable[list[str]]) -> None:
    lines = [header] + [",".join(_csv_cell(c) for c in cells) for cells in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_nv_inputs(directory: Path, variant: str, users: int = 120, seed: int = 13) -> Path:
    """Write a NotifyVisitors job (``variant`` of :data:`NV_VARIANTS`) and its CSV files; returns the job file."""
    rng = random.Random(seed)
    bools = ["true", "false", "yes", "no"]
    rows = []
    for i in range(users):
        ext_id = f"u{i}" if i % 11 else f"ü-{i}"
        long_text = "x" * 1000 if i % 17 == 5 else ""
        rows.append(
            [
                ext_id,
                _pick(rng, _WORDS),
                _pick(rng, _NUMBERS),
                _pick(rng, _DATES),
                _pick(rng, _DATES),
                _pick(rng, bools),
                ";".join(rng.sample(_WORDS, rng.randint(0, 3))),
                long_text or _pick(rng, _WORDS, 0.5),
                _pick(rng, [f"{ext_id}@example.com", "x.y+z@example.com"], 0.5),
                _pick(rng, _MOBILES, 0.3),
                _pick(rng, bools),
                _pick(rng, bools),
            ]
        )
    rows.append([*rows[3][:1], "again", *rows[3][2:]])  # a duplicate ID: one user
    _write(
        directory / "users.csv",
        "id,name,score,born,joined,member,likes,city,email,phone,mail,sms",
        rows,
    )
    legacy = [
        [
            f"l{i}",
            _pick(rng, ["1999-02-03", "1999-2-3", "2023-02-29", "03/02/1999", "19990203"]),
            _pick(rng, ["yes", "No", " TRUE ", "maybe", "1", "0"]),
            _pick(rng, _NUMBERS),
        ]
        for i in range(30)
    ]
    _write(directory / "legacy.csv", "id,bday,optin,age", legacy)
    events = []
    for _ in range(users * 2):
        who = f"u{rng.randrange(users // 4)}" if rng.random() < 0.7 else f"u{rng.randrange(users)}"
        name = rng.choice(["purchase", "refund", "vïew", "n" * 55])
        events.append(
            [
                who,
                name,
                _pick(rng, _NUMBERS),
                long_text_or(rng),
                rng.choice(_DATES),
                _pick(rng, _DATES),
                _pick(rng, bools),
            ]
        )
    events.append(events[-1])  # the same event twice: two rows, two row keys
    _write(directory / "events.csv", "id,event,amount,sku,when,seen,gift", events)
    job = directory / "job.yaml"
    job.write_text(NV_JOB.format(size=BATCH_SIZE, extra=NV_VARIANTS[variant]), encoding="utf-8")
    return job


def long_text_or(rng: random.Random) -> str:
    """A SKU: usually a word, sometimes 1000 characters (refused by the platform: a rejected row of the plan)."""
    return "s" * 1000 if rng.random() < 0.05 else _pick(rng, _WORDS)


def write_fof_inputs(directory: Path, variant: str, users: int = 80, seed: int = 7) -> Path:
    """Write a Forms On Fire job (``variant`` of :data:`FOF_VARIANTS`) and its CSV file; returns the job file."""
    rng = random.Random(seed)
    settings = FOF_VARIANTS[variant]
    numeric_body = bool(settings["body_type"])
    rows = []
    for i in range(users):
        ext_id = f"user{i}@example.com" if settings["user_key"] == "UserEmail" else f"u{i}"
        if i % 13 == 4:
            ext_id += "\x07bell"  # XML cannot carry it: a rejected row in XML mode
        title = _pick(rng, _XML_WORDS + _WORDS)
        if i % 19 == 3:
            title = "ctl\x01x"
        body = _pick(rng, _NUMBERS) if numeric_body else _pick(rng, _XML_WORDS + _WORDS)
        rows.append(
            [
                ext_id,
                title,
                body,
                _pick(rng, ["true", "false", "yes", "no"]),
                _pick(rng, ["0", "60", "3600.0", "86400", "2147483647"]),
            ]
        )
    rows += [[*rows[5][:1], "second push, same user", *rows[5][2:]], list(rows[9])]
    _write(directory / "pushes.csv", "id,title,message,sound,expiry", rows)
    job = directory / "job.yaml"
    job.write_text(FOF_JOB.format(company=COMPANY_ID, **settings), encoding="utf-8")
    return job


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _item_rows(batch: Batch) -> str:
    rows = getattr(batch.origins, "rows", None)
    if rows is None:
        rows = [batch.origins.get(x) for x in batch.ext_ids]
    return _digest("\n".join(f"{Path(r.path).name}:{r.row}" if r is not None else "-" for r in rows))


def fingerprints(batches: Iterable[Batch], wire: dict[str, bytes] | None = None) -> list[str]:
    """What identifies each batch, in order: ``"<batch ID> <endpoint> <phase> <number of IDs> <digest of IDs>
    <after> <digest of item rows> <digest of row keys>"`` and, when ``wire`` maps batch IDs to the request bytes
    sent, their digest."""
    out = []
    for b in batches:
        ids = _digest("\n".join(b.ext_ids))
        keys = hashlib.sha256(b.row_keys).hexdigest()[:12]
        line = f"{b.batch_id} {b.endpoint} {int(b.phase)} {len(b.ext_ids)} {ids} {b.after or '-'} {_item_rows(b)} {keys}"
        if wire is not None:
            line += " " + hashlib.sha256(wire[b.batch_id]).hexdigest()[:12]
        out.append(line)
    return out
