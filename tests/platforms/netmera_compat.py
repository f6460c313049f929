"""Inputs for the batch-ID compatibility test of the Netmera builder (tests/platforms/test_netmera_batches.py).

Deterministic (seeded) CSV files and a job covering what the cutting and the body encoding must get right: tags
in many groups (from a delimited column and from a tag table), categories (several items per user, opt-outs and
opt-ins), events with attributes whose names sort around ``extId`` and ``name`` (non-idempotent: row keys), pushed
list values, one-user endpoints, unset lists, nulls, unicode and JSON's special characters, integral and tiny and
huge numbers. A small batch size and small hash buckets make batches continue from one frame into the next.

``fingerprints`` is what the recorded file (``tests/fixtures/netmera_batch_ids.json``) holds: per batch, its ID,
endpoint, phase and IDs. The file was written by the builder *before* the columnar rewrite (issue 13), so the
test proves that a run planned by the older version keeps its batch IDs. Some users rows add and remove the same
tag, or push and pull the same list value (17 with the default seed): the builder now rejects them at plan time
(:func:`sync.platforms.netmera.requests.check_rows`), and the test says how it compares around them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from pathlib import Path

from sync.records import Batch

BATCH_SIZE = 7
ROWS_PER_BUCKET = 20

_TAGS = ["gold", "vip", "silver", "Ünïcödé", 'q"uote', "back\\slash", "t\x01ab", "sp ace", "€uro", "z"]
_WORDS = ["Ada", "Ünal", "李", "😀 emoji", 'say "hi"', "a\\b", "tab\there", "line\u2028sep", "del\x7f", "é"]
# 2**53: an integral float the encoder writes in repr form. (The recorded batch IDs were made with the literal
# 9007199254740993, which reads as the same float; validation now refuses that literal: it loses precision.)
_NUMBERS = ["1", "2.5", "-0", "0.00001", "1.5e-7", "123456789.125", "1e16", "9007199254740992", "-3", "0.1"]

JOB = """\
version: 1
name: compat
workdir: work
destination:
  platform: netmera
  base_url: http://127.0.0.1:9/rest/3.0/
  secret: {{env: NETMERA_API_KEY}}
dispatch:
  batch_size: {{"*": {size}}}
defaults:
  ext_id: id
sources:
  - name: users
    path: users.csv
    attributes:
      name: string
      score: number
      born: {{attribute: dateOfBirth, type: date}}
      member: {{attribute: isMember, type: boolean}}
      city: {{on_null: unset}}
      nick: {{attribute: aNick, on_null: unset}}
      likes: {{type: list, mode: push, delimiter: ";"}}
      dislikes: {{attribute: likes, type: list, mode: pull, delimiter: ";"}}
    tags:
      - {{column: tags, delimiter: ";"}}
{drop_tags}    opt_ins:
      push: push
      email: mail
      sms: sms
      categories: {{Promo: promo, News: news, "Ünï": uni}}
    email: email
    msisdn: phone
{others}"""


OTHERS = """\
  - name: tag-table
    kind: tags
    path: tags.csv
    tag: tag
    action: action
  - name: events
    kind: events
    path: events.csv
    event: event
    attributes:
      amount: number
      sku: string
      a: {attribute: a}
      extIc: {attribute: extIc}
      extIe: {attribute: extIe}
      nam: {attribute: nam}
      namf: {attribute: namf}
      Zed: {attribute: Zed}
      uni: {attribute: "é"}
  - name: deletions
    kind: deletions
    path: deletions.csv
"""
DROP_TAGS = '      - {column: drop_tags, delimiter: ";", action: untag}\n'


def _csv_cell(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _pick(rng: random.Random, values: list[str], empty: float = 0.3) -> str:
    return "" if rng.random() < empty else rng.choice(values)


def write_inputs(directory: Path, users: int = 150, seed: int = 13, *, snapshot: bool = False) -> Path:
    """Write the job and its CSV files under ``directory``; returns the job file. ``snapshot``: a job of the
    users source alone, without untag columns (what snapshot mode takes)."""
    rng = random.Random(seed)
    bools = ["true", "false", "yes", "no"]
    rows = [
        "id,name,score,born,member,city,nick,likes,dislikes,tags,drop_tags,push,mail,sms,promo,news,uni,email,phone"
    ]
    for i in range(users):
        ext_id = f"u{i}" if i % 11 else f"ü-{i}"
        tags = ";".join(rng.sample(_TAGS, rng.randint(0, 4)))
        drops = ";".join(rng.sample(_TAGS, rng.randint(0, 2))) if rng.random() < 0.4 else ""
        likes = ";".join(rng.sample(_WORDS, rng.randint(0, 3)))
        cells = [
            ext_id,
            _pick(rng, _WORDS),
            _pick(rng, _NUMBERS),
            _pick(rng, ["1989-10-14", "2001-01-01T10:30:00+03:00", "1970-01-01"]),
            _pick(rng, bools),
            _pick(rng, _WORDS, 0.5),
            _pick(rng, _WORDS, 0.5),
            likes,
            _pick(rng, _WORDS, 0.6),
            tags,
            drops,
            _pick(rng, bools),
            _pick(rng, bools),
            _pick(rng, bools),
            _pick(rng, bools),
            _pick(rng, bools),
            _pick(rng, bools),
            _pick(rng, [f"{ext_id}@example.com", "x.y+z@example.com"], 0.5),
            _pick(rng, ["+905312345601", "905312345602"], 0.5),
        ]
        rows.append(",".join(_csv_cell(c) for c in cells))
    (directory / "users.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    tag_rows = ["id,tag,action"]
    for _ in range(users):
        tag_rows.append(
            f"u{rng.randrange(users)},{_csv_cell(rng.choice(_TAGS))},{rng.choice(['add', 'remove', 'tag'])}"
        )
    (directory / "tags.csv").write_text("\n".join(tag_rows) + "\n", encoding="utf-8")
    events = ["id,event,amount,sku,a,extIc,extIe,nam,namf,Zed,uni"]
    for _ in range(users * 2):
        who = f"u{rng.randrange(users // 2)}"
        cells = [who, rng.choice(["purchase", "refund", "vïew"])]
        cells += [_pick(rng, _NUMBERS), _pick(rng, _WORDS)]
        cells += [_pick(rng, _WORDS, 0.6) for _ in range(7)]
        events.append(",".join(_csv_cell(c) for c in cells))
    events.append(events[-1])  # the same event twice: two rows, two row keys
    (directory / "events.csv").write_text("\n".join(events) + "\n", encoding="utf-8")
    deletions = ["id"] + [f"d{i}" for i in range(30)] + ["ü-del"]
    (directory / "deletions.csv").write_text("\n".join(deletions) + "\n", encoding="utf-8")
    job = directory / "job.yaml"
    text = JOB.format(
        size=BATCH_SIZE, drop_tags="" if snapshot else DROP_TAGS, others="" if snapshot else OTHERS
    )
    job.write_text(text, encoding="utf-8")
    return job


def fingerprints(batches: Iterable[Batch]) -> list[str]:
    """What identifies each batch, in order: ``"<batch ID> <endpoint> <phase> <number of IDs> <digest of IDs>"``."""
    out = []
    for b in batches:
        ids = hashlib.sha256("\n".join(b.ext_ids).encode("utf-8")).hexdigest()[:12]
        out.append(f"{b.batch_id} {b.endpoint} {int(b.phase)} {len(b.ext_ids)} {ids}")
    return out
