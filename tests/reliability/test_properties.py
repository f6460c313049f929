"""Property-based tests (hypothesis) of the readers, validation and the planner.

Rows are generated with a known verdict (valid or not, and why) and an independent model computes what the plan
must hold: the rows rejected, the winner of each duplicate ID (the newest row decides: the last row wins when it
is valid, and holds its ID — nothing sent, every row rejected — when it was rejected) and every request item. The
properties:

* every batch names at most ``min(batch_size, 1000)`` unique external IDs, one-user endpoints exactly one, and its
  ``ext_ids`` are the unique IDs of its body;
* every valid row is planned exactly once per operation it implies (no loss, no duplicate), with its typed values;
* rejects, duplicates dropped and clean rows add up to the rows read;
* batches come out phase by phase (opt-outs first) and their IDs are unique;
* the plan is deterministic: the same batches for CSV and Parquet input, any hash-bucket size, and any row order
  when IDs are unique.
"""

from __future__ import annotations

import csv
import io
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.config import Job, load_job
from sync.errors import BadInputError
from sync.planning.planning import build_plan
from sync.platforms.netmera.requests import MAX_IDS_PER_REQUEST, SINGLE_USER_ENDPOINTS, ext_ids_in_body
from sync.records import Batch, Phase, body_json

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    database=None,  # no example database written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

COLUMNS = ("id", "name", "score", "vip", "segments", "push", "news", "promo")
NULLS = ("", "NULL", "null", "NaN", "N/A", "\\N")

_JOB = """\
version: 1
name: prop
workdir: work
destination: {{platform: netmera, base_url: "http://127.0.0.1:9/rest/3.0/", secret: {{env: UNUSED_KEY}}}}
sources:
  - name: users
    path: {path}
    ext_id: id
    attributes: {{name: string, score: number, vip: boolean}}
    tags: {{column: segments, delimiter: "|"}}
    opt_ins:
      push: push
      categories: {{News: news, Promotions: promo}}
dispatch:
  batch_size: {batch_size}
"""

# --- what a row holds, and what it means -------------------------------------------------------------------

_BOOLS = {
    "true": True,
    "yes": True,
    "1": True,
    "T": True,
    "false": False,
    "no": False,
    "0": False,
    "Off": False,
}


@dataclass(frozen=True, slots=True)
class Row:
    cells: tuple[str, ...]
    """The text written to the file, in COLUMNS order."""
    valid: bool
    ext_id: str | None
    """The external ID after trimming (None when missing)."""
    values: tuple[Any, ...]
    """Typed values (name, score, vip, tags, push, news, promo): what the duplicate rule compares."""
    ragged: bool = False
    """A CSV record with the wrong number of fields (rejected as malformed; CSV only)."""


def _typed_or_none(text: str) -> str | None:
    stripped = text.strip(" ")
    return None if stripped in NULLS else stripped


def _bool(text: str) -> bool | None:
    return None if _typed_or_none(text) is None else _BOOLS[text]


ids_valid = st.builds(lambda s: "u" + s, st.text(alphabet="ab1_-é ", min_size=0, max_size=3))
ids_invalid = st.sampled_from(["", "NULL", "  ", "u\tx", "u\x00y", "u\nz", "w" * 257])
names = st.sampled_from(["Ann", "Müller", "12345", "", "  padded  ", "a,b", 'q"uote', "two\nlines", "NULL"])
scores_valid = st.one_of(st.integers(-(10**6), 10**6).map(str), st.sampled_from(["", "NaN", "2.5", "1e3"]))
scores_invalid = st.sampled_from(["abc", "1e400", "0x10", "1,5"])
bools_valid = st.sampled_from([*_BOOLS, ""])
segments = st.lists(st.sampled_from(["gold", "silver", "beta", " spaced "]), max_size=3).map("|".join)


@st.composite
def rows(draw: st.DrawFn, ragged: bool = False) -> Row:
    bad_id = draw(st.booleans()) and draw(st.integers(0, 9)) == 0
    raw_id = draw(ids_invalid if bad_id else ids_valid)
    bad_score = draw(st.integers(0, 14)) == 0
    score = draw(scores_invalid if bad_score else scores_valid)
    bad_vip = draw(st.integers(0, 14)) == 0
    vip = "maybe" if bad_vip else draw(bools_valid)
    name, segs = draw(names), draw(segments)
    push, news, promo = draw(bools_valid), draw(bools_valid), draw(bools_valid)
    ext_id = _typed_or_none(raw_id)
    id_ok = (
        ext_id is not None
        and len(ext_id) <= 256
        and not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in ext_id)
    )
    values: tuple[Any, ...] = ()
    if not (bad_score or bad_vip):
        score_t = _typed_or_none(score)
        tags = tuple(t.strip() for t in segs.split("|") if t.strip())
        values = (
            _typed_or_none(name),
            None if score_t is None else float(score_t),
            _bool(vip),
            tags or None,
            _bool(push),
            _bool(news),
            _bool(promo),
        )
    cells = (raw_id, name, score, vip, segs, push, news, promo)
    if ragged and draw(st.integers(0, 9)) == 0:
        cells = draw(st.sampled_from([(*cells, "extra"), cells[:5], cells[:1] if raw_id else ("x", "y")]))
        return Row(cells=cells, valid=False, ext_id=ext_id, values=(), ragged=True)
    return Row(cells=cells, valid=id_ok and not bad_score and not bad_vip, ext_id=ext_id, values=values)


# --- the model ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expected:
    rejected_rows: frozenset[int]
    dropped: int
    profiles: dict[str, dict[str, Any]]
    tags: Counter[tuple[str, str]]
    push: dict[str, bool]
    categories: Counter[tuple[str, str, bool]]
    clean: int


def model(table: Sequence[Row]) -> Expected:
    """What the plan must hold, computed without the code under test."""
    rejected = {i + 1 for i, r in enumerate(table) if not r.valid}
    # The newest row of each ID decides. A malformed one-line record names the value in the ID column's place
    # (trimmed), one spanning lines names nobody; an ID refused for what it holds never equals a valid one.
    newest: dict[str, int] = {}
    for i, r in enumerate(table):
        named = r.ext_id
        if r.ragged:
            spans_lines = any("\n" in c or "\r" in c for c in r.cells)
            named = None if spans_lines else (r.cells[0].strip() or None)
        if named is not None:
            newest[named] = i
    last: dict[str, int] = {}
    for i, r in enumerate(table):
        if r.valid:
            assert r.ext_id is not None
            if table[newest[r.ext_id]].valid:
                last[r.ext_id] = i
            else:
                rejected.add(i + 1)  # held: its newest row was rejected
    dropped = 0
    for i, r in enumerate(table):
        if r.valid and r.ext_id in last and last[r.ext_id] != i:
            if r.values == table[last[r.ext_id or ""]].values:
                dropped += 1
            else:
                rejected.add(i + 1)
    profiles: dict[str, dict[str, Any]] = {}
    tags: Counter[tuple[str, str]] = Counter()
    push: dict[str, bool] = {}
    categories: Counter[tuple[str, str, bool]] = Counter()
    for ext_id, i in last.items():
        name, score, vip, segs, push_v, news, promo = table[i].values
        profile = {"name": name, "score": score, "vip": vip}
        profile = {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in profile.items()}
        profile = {k: v for k, v in profile.items() if v is not None}
        if profile:
            profiles[ext_id] = profile
        for tag in dict.fromkeys(segs or ()):
            tags[(tag, ext_id)] += 1
        if push_v is not None:
            push[ext_id] = push_v
        for category, value in (("News", news), ("Promotions", promo)):
            if value is not None:
                categories[(ext_id, category, value)] += 1
    return Expected(frozenset(rejected), dropped, profiles, tags, push, categories, len(last))


# --- writing input and planning -----------------------------------------------------------------------------------


def write_input(directory: Path, table: Sequence[Row], fmt: str) -> Path:
    if fmt == "csv":
        path = directory / "users.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows(r.cells for r in table)
    else:
        path = directory / "users.parquet"
        pl.DataFrame(
            {c: [r.cells[i] for r in table] for i, c in enumerate(COLUMNS)},
            schema={c: pl.String for c in COLUMNS},
        ).write_parquet(path)
    return path


def make_job(directory: Path, data: Path, batch_size: int) -> Job:
    job = directory / "job.yaml"
    job.write_text(_JOB.format(path=data.name, batch_size=batch_size), encoding="utf-8")
    return load_job(job)


def plan_of(job: Job, rows_per_bucket: int = 50_000) -> tuple[list[Batch], set[int], dict[str, int]]:
    with build_plan(job, rows_per_bucket=rows_per_bucket) as plan:
        batches = list(plan.batches())
        rejected = {r.row for r in plan.rejected_rows()}
        s = plan.summary()
        counts = {
            "read": s.rows_read,
            "clean": s.rows_clean,
            "rejected": s.rejected_count,
            "dropped": s.duplicates_dropped,
            "requests": s.total_requests,
        }
    return batches, rejected, counts


def check_limits(batches: Sequence[Batch], batch_size: int) -> None:
    limit = min(batch_size, MAX_IDS_PER_REQUEST)
    for b in batches:
        assert b.ext_ids == ext_ids_in_body(b.endpoint, body_json(b))
        if b.endpoint in SINGLE_USER_ENDPOINTS:
            assert len(b.ext_ids) == 1 and isinstance(body_json(b), dict) and "extId" in body_json(b)
        else:
            assert 1 <= len(b.ext_ids) <= limit
    assert len({b.batch_id for b in batches}) == len(batches)
    phases = [b.phase for b in batches]
    assert phases == sorted(phases)


def planned(
    batches: Sequence[Batch],
) -> tuple[Counter[str], dict[str, Any], Counter[Any], Counter[Any], Counter[Any]]:
    profile_ids: Counter[str] = Counter()
    profiles: dict[str, Any] = {}
    tags: Counter[tuple[str, str]] = Counter()
    push: Counter[tuple[str, bool]] = Counter()
    categories: Counter[tuple[str, str, bool]] = Counter()
    for b in batches:
        if b.endpoint == "setProfileAttributes":
            for item in body_json(b):
                profile_ids[item["extId"]] += 1
                profiles[item["extId"]] = item["profile"]
        elif b.endpoint == "tagUsers":
            tags.update((body_json(b)["tag"], x) for x in body_json(b)["extIds"])
        elif b.endpoint in ("enablePush", "disablePush"):
            push[(body_json(b)["extId"], b.endpoint == "enablePush")] += 1
        elif b.endpoint == "setCategoryPreferences":
            categories.update((i["extId"], i["category"], i["enable"]) for i in body_json(b))
            enables = {i["enable"] for i in body_json(b)}
            assert len(enables) == 1 and (b.phase is Phase.OPT_OUT) == (enables == {False})
        else:
            raise AssertionError(f"unexpected endpoint {b.endpoint}")
    return profile_ids, profiles, tags, push, categories


@PROPERTY_SETTINGS
@given(
    table=st.lists(rows(ragged=True), max_size=60),
    batch_size=st.integers(1, 7),
    fmt=st.sampled_from(["csv", "parquet"]),
)
def test_every_valid_row_is_planned_exactly_once_within_the_limits(
    table: list[Row], batch_size: int, fmt: str
) -> None:
    if fmt == "parquet":  # a Parquet file cannot hold a record of the wrong width
        table = [r for r in table if not r.ragged]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        job = make_job(directory, write_input(directory, table, fmt), batch_size)
        batches, rejected, counts = plan_of(job)
    want = model(table)
    check_limits(batches, batch_size)
    assert rejected == want.rejected_rows
    assert counts["read"] == len(table)
    assert counts["rejected"] == len(want.rejected_rows)
    assert (counts["clean"], counts["dropped"]) == (want.clean, want.dropped)
    assert counts["requests"] == len(batches)
    profile_ids, profiles, tags, push, categories = planned(batches)
    assert set(profile_ids.values()) <= {1}  # each user once
    assert profiles == want.profiles
    assert tags == want.tags
    assert push == Counter(want.push.items())
    assert categories == want.categories


@PROPERTY_SETTINGS
@given(
    n_users=st.integers(0, 2600),
    batch_size=st.sampled_from([1, 3, 999, 1000]),
    seed=st.integers(0, 2**32 - 1),
)
def test_large_inputs_split_into_full_batches_of_at_most_1000(
    n_users: int, batch_size: int, seed: int
) -> None:
    rng = random.Random(seed)
    ids = [f"user-{rng.getrandbits(40):x}-{i}" for i in range(n_users)]
    table = [
        Row(
            cells=(x, "", str(i), "", "gold" if i % 3 else "", "", "true", "false"),
            valid=True,
            ext_id=x,
            values=(),
        )
        for i, x in enumerate(ids)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        job = make_job(directory, write_input(directory, table, "csv"), batch_size)
        batches, rejected, counts = plan_of(job, rows_per_bucket=rng.choice([100, 50_000]))
    assert rejected == set()
    check_limits(batches, batch_size)
    size = min(batch_size, MAX_IDS_PER_REQUEST)
    per_endpoint = Counter(b.endpoint for b in batches)
    gold = sum(1 for i in range(n_users) if i % 3)
    ceil = lambda n: -(-n // size)  # noqa: E731
    assert per_endpoint["setProfileAttributes"] == ceil(n_users)
    assert per_endpoint["tagUsers"] == ceil(gold)
    # Two category items per user (News on, Promotions off) go to two streams: opt-outs and opt-ins.
    assert per_endpoint["setCategoryPreferences"] == 2 * ceil(n_users)
    # Every batch but the last of its stream is full: no batch is split smaller than it needs to be.
    for endpoint in ("setProfileAttributes", "tagUsers"):
        sizes = [len(b.ext_ids) for b in batches if b.endpoint == endpoint]
        assert all(s == size for s in sizes[:-1])
    assert counts["requests"] == len(batches)
    profile_ids, _, tags, _, categories = planned(batches)
    assert set(profile_ids) == set(ids) and set(profile_ids.values()) <= {1}
    assert sum(tags.values()) == gold and set(tags.values()) <= {1}
    assert sum(categories.values()) == 2 * n_users and set(categories.values()) <= {1}


@PROPERTY_SETTINGS
@given(
    table=st.lists(rows(), max_size=50, unique_by=lambda r: r.ext_id),
    seed=st.integers(0, 2**32 - 1),
    batch_size=st.integers(1, 5),
)
def test_batches_do_not_depend_on_row_order_format_or_bucket_size(
    table: list[Row], seed: int, batch_size: int
) -> None:
    shuffled = list(table)
    random.Random(seed).shuffle(shuffled)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (rows_, fmt, bucket) in enumerate(
            [(table, "csv", 50_000), (shuffled, "csv", 1), (shuffled, "parquet", 3)]
        ):
            directory = Path(tmp) / str(i)
            directory.mkdir()
            job = make_job(directory, write_input(directory, rows_, fmt), batch_size)
            batches, _, _ = plan_of(job, rows_per_bucket=bucket)
            results.append([(b.batch_id, b.endpoint, body_json(b)) for b in batches])
    assert results[0] == results[1] == results[2]


_NOISE = st.one_of(
    st.binary(max_size=40),
    st.text(alphabet=',;"\n\r\t \x00|\\abcé1-.', max_size=40).map(lambda t: t.encode("utf-8")),
    st.sampled_from(
        [b"\xef\xbb\xbf", b"\xff\xfe", b"NULL", b'"', b'""', b",,,,,,,", b"\r\n", "Ş".encode("cp1254")]
    ),
)


@PROPERTY_SETTINGS
@given(
    header=st.sampled_from(
        [",".join(COLUMNS).encode() + b"\n", b"\xef\xbb\xbf" + ",".join(COLUMNS).encode() + b"\r\n", b""]
    ),
    body=st.lists(_NOISE, max_size=30).map(b"".join),
)
def test_any_bytes_give_rejects_or_one_clear_error_never_a_traceback(header: bytes, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        data = directory / "users.csv"
        data.write_bytes(header + body)
        job = make_job(directory, data, 1000)
        try:
            batches, _, counts = plan_of(job)
        except BadInputError as exc:
            assert exc.path == str(data) and exc.reason
            return
    check_limits(batches, 1000)
    assert counts["read"] == counts["clean"] + counts["rejected"] + counts["dropped"]
    for b in batches:
        for ext_id in b.ext_ids:
            assert ext_id and not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in ext_id)


def _parquet_bytes(n: int) -> bytes:
    sink = io.BytesIO()
    pl.DataFrame(
        {c: [f"{c}{i}" if c in ("id", "name") else "" for i in range(n)] for c in COLUMNS},
        schema={c: pl.String for c in COLUMNS},
    ).write_parquet(sink, compression="uncompressed")
    return sink.getvalue()


_SMALL_PARQUET = _parquet_bytes(50)


@PROPERTY_SETTINGS
@given(
    damage=st.lists(
        st.tuples(st.integers(0, len(_SMALL_PARQUET) - 1), st.integers(0, 255)), min_size=1, max_size=6
    )
)
def test_a_damaged_parquet_file_gives_rows_or_one_clear_error_never_a_crash(
    damage: list[tuple[int, int]],
) -> None:
    data = bytearray(_SMALL_PARQUET)
    for at, value in damage:
        data[at] = value
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        path = directory / "users.parquet"
        path.write_bytes(bytes(data))
        job = make_job(directory, path, 1000)
        try:
            batches, _, counts = plan_of(job)
        except BadInputError as exc:  # anything else — a polars panic included — fails the test
            assert exc.path == str(path) and exc.reason
            return
    check_limits(batches, 1000)
    assert counts["read"] == counts["clean"] + counts["rejected"] + counts["dropped"]


def test_a_parquet_footer_naming_a_column_in_bytes_that_are_not_utf8_is_named_or_read() -> None:
    # Each place the footer names a column, made not UTF-8 in turn: reading the column chunks' sizes (to cut
    # chunks by bytes) raised UnicodeDecodeError — a crash — where the reader names the damaged file. Found by the
    # property test above in CI (polars 2.2.0 writes a footer 68 bytes longer, so the random damage fell there).
    base = bytes(_SMALL_PARQUET)
    footer = len(base) - 8 - int.from_bytes(base[-8:-4], "little")
    places = [i for i in range(footer, len(base) - 8) if base[i : i + 4] == b"name"]
    assert len(places) >= 3  # the schema, the column chunk's path, the Arrow schema (at least)
    for at in places:
        data = bytearray(base)
        data[at] = 0x80
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "users.parquet"
            path.write_bytes(bytes(data))
            try:
                _, _, counts = plan_of(make_job(Path(tmp), path, 1000))
            except BadInputError as exc:
                assert exc.path == str(path) and exc.reason
                continue
        assert counts["read"] == 50, at


def test_row_numbers_stay_exact_across_blocks_with_malformed_and_multiline_records() -> None:
    """180,000 rows (4 MiB: several reader blocks and chunks), a malformed record every 997 rows and a value
    spanning two lines every 13: every malformed record is rejected under its own row number, every other row is
    planned once, and each batch names the right input row for each of its IDs."""
    n = 180_000
    lines, malformed = [], set()
    for i in range(n):
        if i % 997 == 500:
            lines.append(f"u{i},X,{i},,,,,,,extra")
            malformed.add(i + 1)
        elif i % 13 == 0:
            lines.append(f'u{i},"two\nlines",{i},,,,,')
        else:
            lines.append(f"u{i},N,{i},,,,,")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        data = directory / "users.csv"
        data.write_text(",".join(COLUMNS) + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
        with build_plan(make_job(directory, data, 1000)) as plan:
            rejected = {r.row for r in plan.rejected_rows()}
            origins: dict[str, int] = {}
            for b in plan.batches():
                for ext_id in b.ext_ids:
                    assert ext_id not in origins
                    origins[ext_id] = b.origins[ext_id].row
    assert rejected == malformed
    assert origins == {f"u{i}": i + 1 for i in range(n) if i + 1 not in malformed}
