"""One rate limit's bookkeeping: N per period, clock-aligned windows, the hard cap, pauses, adaptation, margin.

Private: :mod:`sync.dispatch.budget` is the public face. A :class:`RateMeter` holds no waiters and sets no timers; it
answers two questions — "when may the next request go?" (:meth:`RateMeter.earliest`) and "one went now"
(:meth:`RateMeter.release`) — and learns from answers (429s, ``X-RateLimit-Remaining``, latencies). The
scheduler in :mod:`sync.dispatch.budget` releases an attempt only when *every* meter it needs (its endpoint's budget and
each budget group holding the endpoint) says it may go, and then counts it in all of them at once, so a request
is always counted in the window it is sent in.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sync.config import RateBudgetSpec
from sync.logs import get_logger

_EPS = 1e-9
MIN_MARGIN = 0.01
"""Smallest learned margin before a window's end, seconds: timer lateness and a little clock skew."""
_MARGIN_SAMPLES = (
    200  # latencies kept for the learned margin (the newest ones: the margin follows the network)
)
_MARGIN_MIN_SAMPLES = 20  # below this, the default margin stays
_MARGIN_EVERY = 10  # recompute the learned margin every this many latencies
_SLACK = 0.5
"""Share of an aligned window's sending zone left after its N nominal slots: room to catch up, before the zone
ends, the slots that a late timer or a stalled loop could not release on time (see :meth:`RateMeter.earliest`).
Half: on a core shared with a CPU-bound process, a loaded machine stalled the loop for 0.1-0.6 s at a time; a
virtual-clock model of that lost 0.14 % of the budget on average with a fifth of the zone, 0.01 % with half."""
_FIRST_SQUEEZE = 4
"""The budget's first window spreads its N slots over what is left of its zone at the run's first release, but
never closer than a quarter of the nominal spacing: a run that begins just before a zone's end sends a few
there, not all N in a few milliseconds (which the requests in flight, capped by ``concurrency``, could then
carry out only after the window's edge)."""
_WINDOW_GUARD = 1e-5
"""Seconds from a window's edges within which :meth:`RateMeter._window_bounds` computes the window afresh: far
more than the rounding of ``(t + offset) / period`` on Unix times (about 2.4e-7 s)."""
_WINDOW_RECORDS = 4096  # per-window records kept for the summary and the ``budget.window`` log lines


@dataclass(frozen=True, slots=True)
class WindowUse:
    """One clock-aligned window of a configured, aligned budget: the slots it allowed, how many were released,
    and why the others were not — told apart so a run that left budget unused says where it went."""

    window: int
    """Index of the window (``RateMeter.window_of``)."""
    allowed: int
    """N in force in the window (the configured budget, or less after a window with too many 429s)."""
    released: int
    idle: int
    """Slots that came due while no attempt waited for this budget: the run had nothing to send then (the
    plan not ready, retries backing off, the end of a phase)."""
    waiting: int
    """Slots that came due while an attempt waited, yet were not released before the window's sending zone
    ended: the event loop did not run in time (a stalled loop), or another limit of that attempt (a group,
    the endpoint's own budget) held it."""
    paused: int
    """Slots inside a pause (a 429's ``Retry-After``, ``X-RateLimit-Remaining: 0``)."""
    carried: int
    """Slots held for requests released late in the window before (catching up, in its zone's second half) that
    had no answer by this window's start: the server may have counted them in this window (they arrived after
    its edge: a stalled server, network or loop)."""
    late_max: float
    """The most a waiting attempt was released after its slot came due, seconds (the loop's lateness)."""
    margin: float
    """The margin before the window's end in force, seconds."""


@dataclass(frozen=True, slots=True)
class BudgetStats:
    """Counters for the summary: releases, 429s seen, time paused, rates, and the margin in use."""

    released: int
    rate_limited: int
    paused_seconds: float
    rate: float | None
    ceiling: float | None
    period: float
    margin: float = 0.0
    """Seconds kept free before each window's end (learned from latencies unless the job fixed it)."""
    decreases: int = 0
    """Times the rate was lowered because too many answers of a window were 429s."""
    per_window: Mapping[int, int] = field(default_factory=dict)
    """Releases per clock-aligned period (index: ``window_of``), configured budgets only."""
    starved_windows: frozenset[int] = frozenset()
    """Periods in which the budget had a slot free for longer than a spacing and no attempt asked for it: the
    run had nothing to send then (planning, retries' back-off, the end of a phase), which is not the budget's
    doing."""
    stalled_windows: frozenset[int] = frozenset()
    """Periods in which the event loop released a waiting attempt more than a spacing after its slot was due
    (the loop was stalled: a CPU-bound neighbour, the interpreter held by another thread). The use over the
    busy periods that are neither starved nor stalled is the budget's own."""
    windows: tuple[WindowUse, ...] = ()
    """Per window with a release (aligned, configured budgets; the newest few thousand): allowed, released, and
    why the rest was not (see :class:`WindowUse`)."""


class LatencyLearner:
    """The p99 of the newest release-to-answer times, recomputed every few answers.

    One per :class:`sync.dispatch.budget.BudgetPool`: every endpoint of a job talks to the same server over the same
    network, so the meters of a pool (endpoints and groups) learn one margin from every answer — sooner than
    from their own answers alone, and the same for all of them, so no group keeps a slot at a window's end
    that the endpoint meters of its members would refuse.
    """

    __slots__ = ("_samples", "_since", "p99", "slowest")

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=_MARGIN_SAMPLES)  # the newest latencies
        self._since = 0  # latencies observed since p99 was last recomputed
        self.p99: float | None = None
        """The p99 of the kept latencies; None until enough were observed."""
        self.slowest: float | None = None
        """The longest latency observed so far; None before the first (bounds the first window's edge)."""

    def observe(self, latency: float) -> bool:
        """Keep one latency; True when :attr:`p99` was recomputed."""
        if not math.isfinite(latency) or latency < 0:
            return False
        self._samples.append(latency)
        self._since += 1
        self.slowest = latency if self.slowest is None else max(self.slowest, latency)
        if len(self._samples) < _MARGIN_MIN_SAMPLES or self._since < _MARGIN_EVERY:
            return False
        self._since = 0
        ordered = sorted(self._samples)
        self.p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        return True


class RateMeter:
    """At most N requests per period T: when the next may go, and what the answers teach. See the module doc."""

    __slots__ = (
        "_aligned",
        "_anchor",
        "_answer_released",
        "_answered",
        "_answers",
        "_answers_seen",
        "_ceiling",
        "_clean",
        "_clean_windows",
        "_count",
        "_decrease",
        "_decreases",
        "_discover_period",
        "_edge_from",
        "_eval_window",
        "_expect_answers",
        "_finishing",
        "_fixed_lead",
        "_grid",
        "_history",
        "_increase",
        "_last_release",
        "_late_count",
        "_late_from",
        "_lead",
        "_learn",
        "_learner",
        "_limited",
        "_limited_share",
        "_log",
        "_max_margin",
        "_max_pause",
        "_on_change",
        "_paused_seconds",
        "_paused_until",
        "_pauses",
        "_per_window",
        "_period",
        "_prev_edge_from",
        "_prev_late_from",
        "_rate",
        "_rate_limited",
        "_released",
        "_spill",
        "_stalled",
        "_starved",
        "_tail",
        "_time",
        "_w_first",
        "_w_late",
        "_w_n",
        "_w_records",
        "_w_span",
        "_w_tail",
        "_wall_offset",
        "_wb",
        "_wb_hi",
        "_wb_lo",
        "_window",
        "name",
    )

    def __init__(
        self,
        spec: RateBudgetSpec | None,
        *,
        name: str = "",
        align: bool | None = None,
        tail: float | None = None,
        lead: float | None = None,
        wall_offset: float | None = None,
        decrease: float = 0.7,
        increase: float = 0.1,
        limited_share: float = 0.1,
        clean_windows: int = 2,
        max_pause: float = 300.0,
        discover_period: float = 1.0,
        learner: LatencyLearner | None = None,
        expect_answers: bool = False,
    ) -> None:
        if spec is not None and (spec.requests < 1 or spec.period <= 0):
            raise ValueError(f"rate budget needs requests >= 1 and period > 0, got {spec}")
        if not 0 < decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        self.name = name  # the endpoint's or the group's name, for logs and stats
        self._time: Callable[[], float] | None = None  # the clock's time(); set by bind()
        self._on_change: list[Callable[[], None]] = []  # schedulers to wake when a pause or the rate changes
        self._period: float = spec.period if spec else discover_period  # T, seconds
        self._ceiling: float | None = float(spec.requests) if spec else None  # configured N; None: discover
        self._rate: float | None = self._ceiling  # current allowed requests per period; None: unthrottled
        self._discover_period: float = discover_period
        self._decrease: float = decrease  # factor applied after a window with too many 429s
        self._increase: float = increase  # share added back after ``clean_windows`` windows without a 429
        self._limited_share: float = (
            limited_share  # a window with more 429s than this share of answers: slow down
        )
        self._clean_windows: int = clean_windows
        self._max_pause: float = max_pause  # a Retry-After above this is absurd and capped
        margin = tail if tail is not None else (spec.margin if spec else None)
        # No margin given: start from a safe default, then follow the latencies observed (observe()).
        self._learn: bool = margin is None
        self._max_margin: float = min(0.3 * self._period, 2.0)  # the learned margin stays at most this
        self._tail: float = (
            min(0.2 * self._period, 1.0) if margin is None else margin
        )  # margin before window end
        self._fixed_lead: float | None = lead  # margin after window start, if given; else tail / 4
        self._lead: float = self._tail / 4 if lead is None else lead
        want_aligned = align if align is not None else (spec.align if spec else True)
        # Alignment only makes sense when the margins leave room to send in: otherwise fall back to spacing.
        self._aligned: bool = want_aligned and self._period - self._tail - self._lead > 0
        self._wall_offset: float | None = wall_offset  # wall clock minus clock time; None until bound
        self._history: deque[float] = deque()  # release times within the last cap period (sliding cap)
        self._grid: float = -math.inf  # nominal time of the next evenly spaced slot (unaligned mode)
        self._last_release: float = -math.inf  # actual time of the last release
        self._window: int = -1  # index of the aligned window that _count refers to
        self._count: int = 0  # releases in that window
        # Releases in the second half of that window's zone (catching up: nearer its end) and the answers to
        # them received within the window; those with no answer by the edge may arrive after it.
        self._late_from: float = math.inf  # where that second half begins
        self._prev_late_from: float = math.inf  # the same for the window before
        self._late_count: int = 0
        self._answered: int = 0
        self._spill: int = 0  # late releases of the window before with no answer by that window's start
        # The budget's first window also sends in its edge, past its zone's end (see earliest()): where that
        # edge began, and the same for the window before (an answer to a release there counts only if it came
        # ``lead`` before the window's end).
        self._edge_from: float = math.inf
        self._prev_edge_from: float = math.inf
        self._answers_seen: bool = False  # answers are reported (answered()): only then is _spill counted
        # When the request whose answer was reported last (answered()) was released: what its answer says
        # (X-RateLimit-Remaining: 0) is about the window it was counted in, which may have ended since.
        self._answer_released: float | None = None
        # The caller reports every answer (a BudgetPool: the dispatcher does): the first window's late releases
        # are then held against the next window even before the first answer came (see _carried()).
        self._expect_answers: bool = expect_answers
        self._anchor: float = -math.inf  # time of that window's first release: its slots count from here
        self._paused_until: float = -math.inf  # no release before this (Retry-After / window reset)
        self._pauses: deque[tuple[float, float]] = deque(maxlen=64)  # recent pauses (from, until): WindowUse
        self._eval_window: int | None = None  # the window whose answers _answers/_limited count
        self._answers: int = 0  # answers (2xx and 429) in that window
        self._limited: int = 0  # 429s among them
        self._clean: int = 0  # consecutive windows with answers and no 429
        # Release-to-answer latencies: the pool's (shared by its meters) or this meter's own.
        self._learner: LatencyLearner = learner if learner is not None else LatencyLearner()
        self._released: int = 0
        self._per_window: dict[int, int] = {}  # releases per aligned period (configured budgets only)
        self._starved: set[int] = set()  # periods with a free slot nobody asked for (see BudgetStats)
        self._stalled: set[int] = (
            set()
        )  # periods in which a timer fired over a spacing late (see BudgetStats)
        self._rate_limited: int = 0
        self._paused_seconds: float = 0.0
        self._decreases: int = 0
        # The current window's figures for its WindowUse record (aligned, configured budgets).
        self._w_late: float = 0.0  # the most a waiting attempt was released after its slot
        self._w_n: int = 0  # N in force when the window opened
        self._w_tail: float = self._tail  # the margin in force when the window opened
        # The budget's first window: the part of its sending zone left at the first release, over whose first
        # half its N slots are spread (inf: every other window spreads them over its whole zone's first half).
        self._w_span: float = math.inf
        self._w_first: bool = False  # the current window is the budget's first (it may send in its edge)
        self._finishing: bool = False  # only the run's last attempts are left (set_finishing()): slots closer
        self._w_records: deque[WindowUse] = deque(maxlen=_WINDOW_RECORDS)
        # The last window _window_bounds computed, and the interior of it where a time needs no division (a
        # request asks for its window about ten times: a budget far above what is sent must cost nothing).
        self._wb: tuple[int, float] = (0, 0.0)
        self._wb_lo: float = math.inf
        self._wb_hi: float = -math.inf
        self._log = get_logger(budget=name)

    # -- wiring --------------------------------------------------------------------------------------------

    def bind(self, now: Callable[[], float], on_change: Callable[[], None] | None = None) -> None:
        """Read time from ``now`` (a clock's ``time``); call ``on_change`` when a pause or the rate changes."""
        self._time = now
        if self._wall_offset is None:
            self._wall_offset = time.time() - now()
            self._forget_window()
        if on_change is not None:
            self._on_change.append(on_change)

    def _now(self) -> float:
        assert self._time is not None, "RateMeter.bind() first"
        return self._time()

    def _changed(self) -> None:
        for wake in self._on_change:
            wake()

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """Requests per period currently allowed (None: unthrottled, nothing discovered yet)."""
        return self._rate

    @property
    def period(self) -> float:
        """The period T in seconds."""
        return self._period

    @property
    def ceiling(self) -> float | None:
        """The configured N (None: no budget configured; the rate is discovered)."""
        return self._ceiling

    @property
    def margin(self) -> float:
        """Seconds kept free before a window's end (aligned mode)."""
        return self._tail

    def window_of(self, t: float) -> int:
        """Index of the clock-aligned period holding clock time ``t`` (for per-window counts)."""
        return self._window_bounds(t)[0]

    def stats(self) -> BudgetStats:
        """The counters so far."""
        return BudgetStats(
            released=self._released,
            rate_limited=self._rate_limited,
            paused_seconds=self._paused_seconds,
            rate=self._rate,
            ceiling=self._ceiling,
            period=self._period,
            margin=self._tail,
            decreases=self._decreases,
            per_window=dict(self._per_window),
            starved_windows=frozenset(self._starved),
            stalled_windows=frozenset(self._stalled),
            windows=(*self._w_records, *self._open_window_use()),
        )

    # -- the schedule ----------------------------------------------------------------------------------------

    def _n(self) -> int:
        assert self._rate is not None
        return max(1, int(self._rate + _EPS))

    def _window_bounds(self, t: float) -> tuple[int, float]:
        """The aligned window holding clock time ``t``: its index and start (in clock time)."""
        if self._wb_lo <= t < self._wb_hi:
            return self._wb
        off = self._wall_offset or 0.0
        period = self._period
        k = math.floor((t + off) / period + _EPS)
        found = k, k * period - off
        # A time this far inside the window is in it whatever the rounding of the formula above (a few tenths
        # of a microsecond on Unix times), so the next ones are answered without it; near an edge, the formula.
        self._wb = found
        self._wb_lo = found[1] + _WINDOW_GUARD
        self._wb_hi = found[1] + period - _WINDOW_GUARD
        return found

    def _forget_window(self) -> None:
        """The period or the offset changed: the window remembered by :meth:`_window_bounds` is no longer one."""
        self._wb_lo, self._wb_hi = math.inf, -math.inf

    def _until_window_reset(self, now: float) -> float:
        if self._aligned or self._rate is None:
            _, start = self._window_bounds(now)
            return start + self._period + self._lead - now
        return self._period + self._tail

    def earliest(self, now: float, after: float | None = None) -> float:
        """Earliest time (>= ``now`` and >= ``after``) at which the next release may happen.

        Timed from the clock, never from how often this is asked. Aligned: the i-th release of a window may go
        from its slot's time on (the slots are evenly spaced), and only inside the window's sending zone, at
        most N. A loop that wakes late therefore releases every slot of the window whose time has come — so
        the budget does not depend on the loop being on time — and never one of the next window early; a slot
        the zone's end overtook is gone, never carried into the next window (no burst across a window edge).
        Unaligned: N per sliding ``T + margin`` over release times, evenly spaced, a late timer's slot at
        least half a spacing after the last release (no burst).
        """
        t = max(now, self._paused_until, after if after is not None else now)
        if self._rate is None:
            return t
        n = self._n()
        if not self._aligned:
            cap_period = self._period + self._tail
            history = self._history
            while history and history[0] <= now - cap_period:
                history.popleft()
            if len(history) >= n:
                t = max(t, history[-n] + cap_period)
            spacing = cap_period / n
            # The grid keeps slots evenly spaced without carrying timer lateness forward; the minimum gap
            # to the last actual release stops a late timer from being "caught up" as a burst.
            return max(t, self._grid, self._last_release + spacing / 2)
        spacing = self._slot_spacing(n)
        for _ in range(4):  # at most a couple of hops: the next window is always free
            k, start = self._window_bounds(t)
            zone_start, zone_end = start + self._lead, start + self._period - self._tail
            # Requests released late in the window before (catching up, in its zone's second half) with no
            # answer by the edge may have arrived after it: the server then counts them in this window, so
            # each takes one of its N. (Regular slots, in the zone's first half, are far enough from the edge
            # that only a server stalled over half a window could count them in the next; an answer that is
            # merely slow must not cost a slot.)
            if k == self._window:
                count, room = self._count, n - self._spill
                slot = max(t, self._anchor + self._count * spacing)
                edge = self._w_first
            else:
                count, slot = 0, max(t, zone_start)
                room = n - (self._carried() if k == self._window + 1 else 0)
                # Before the run's first release, the window it begins in is the budget's first.
                edge = self._window < 0 and not self._paused_until > self._last_release
            if edge and self._learn and self._learner.slowest is not None and self._holds_unanswered():
                # The budget's first window also sends in its edge, past its zone's end (the default margin
                # until enough answers taught one), up to where a request would be answered ``lead`` before the
                # window's end if it took as long as the slowest answer so far. One whose answer has not come by
                # then may be counted by the server in the next window: it takes one of that window's N (see
                # _carried). Before any answer nothing says how long they take: no edge.
                zone_end = max(zone_end, start + self._period - self._lead - self._learner.slowest)
            if count < room and slot < zone_end:
                return slot
            t = max(t, start + self._period + self._lead)
        return t

    def _holds_unanswered(self) -> bool:
        """Whether the current window's late releases with no answer by its edge take slots of the next window
        (see :meth:`_carried`): the first window's edge opens only then."""
        return (
            self._answers_seen
            or (self._w_first and self._expect_answers)
            or (self._window < 0 and self._expect_answers)
        )

    def _carried(self) -> int:
        """Slots of the window after the current one taken by the current window's late releases that may reach
        the server after its edge: those released in its zone's second half (or its edge) with no answer by the
        edge (``lead`` before it, in the edge). Only once answers are reported (a caller that never reports
        them would otherwise lose those slots in every window) — but in the budget's first window, when the
        caller is known to report them (``expect_answers``), also before the first answer came: the run's first
        requests may take longest (a new connection, a cold server: measured, one released at the zone's end
        of a run's first window arrived after the edge before any answer came, 21 in the next window, a 429)."""
        if self._answers_seen or (self._w_first and self._expect_answers):
            return max(0, self._late_count - self._answered)
        return 0

    def set_finishing(self, on: bool) -> None:
        """Only the run's last attempts are left for this budget (every batch of its endpoints was taken by a
        worker: the attempts in flight, their retries and splits), or (``on=False``) new work came after all.

        The rest of the run then fits in as few windows as the budget allows: the slots come up to
        ``_FIRST_SQUEEZE`` times closer than nominal, as in the run's first window, so the last window's few
        requests leave at its start instead of spread over half of it (the run ends when they are answered).
        Still never more than N per window nor a slot outside its zone; the next slot stays where it was."""
        if on == self._finishing:
            return
        if self._aligned and self._rate is not None and self._window >= 0:
            n = self._n()
            upcoming = self._anchor + self._count * self._slot_spacing(n)
            if self._time is not None:
                # A slot already due stays due, but the closer slots start from now: no catching up at once
                # what the closer spacing would have placed before now.
                upcoming = max(upcoming, self._time())
            self._finishing = on
            self._anchor = upcoming - self._count * self._slot_spacing(n)
        else:
            self._finishing = on
        self._changed()

    def _nominal_spacing(self) -> float:
        n = self._n()
        return self._spacing(n) if self._aligned else (self._period + self._tail) / n

    def _spacing(self, n: int) -> float:
        """Nominal gap between the aligned slots of one window: the N slots fill the sending zone but its
        last ``_SLACK`` share, where slots a late loop missed are caught up (see :mod:`sync.dispatch.budget`)."""
        return (self._period - self._lead - self._tail) * (1 - _SLACK) / n

    def _slot_spacing(self, n: int) -> float:
        """The gap between the slots of the current window: nominal, but in the budget's first window, which
        spreads its N slots over the first half of what was left of its zone at the first release (a run that
        begins mid-window fills that window too, evenly), at most ``_FIRST_SQUEEZE`` times closer; and
        ``_FIRST_SQUEEZE`` times closer once only the run's last attempts are left (:meth:`set_finishing`)."""
        nominal = self._spacing(n)
        if self._finishing:
            return nominal / _FIRST_SQUEEZE
        if self._w_span == math.inf:
            return nominal
        return max(nominal / _FIRST_SQUEEZE, min(nominal, self._w_span * (1 - _SLACK) / n))

    def release(
        self, now: float, *, waited: bool = True, due: float | None = None, since: float | None = None
    ) -> None:
        """Count one request released at ``now``. ``waited=False``: it went straight through (nothing waited
        for this budget), which marks the periods since its slot was free as starved when that was long ago;
        ``due``: when the timer that released it was due, which marks the periods since then as stalled when
        that was long ago; ``since``: when the released attempt began to wait (for the per-window records:
        its lateness, and whether an attempt waited for the slots a window could not release)."""
        if self._ceiling is not None and self._rate is not None:
            if not waited:
                self._note_starved(now)
            elif due is not None and now - due > self._nominal_spacing():
                first, last = self._window_bounds(due)[0], self._window_bounds(now)[0]
                self._stalled.update(range(first, last + 1))
        # A pause (a 429, remaining 0) was set after the last release: the slots that fell in it are not caught
        # up when it ends — the server just asked for less, not for a burst.
        after_pause = self._paused_until > self._last_release
        self._released += 1
        self._last_release = now
        self._history.append(now)
        if self._rate is None:
            # Unthrottled: remember recent releases only for discovery at the first 429.
            while self._history and self._history[0] <= now - self._discover_period:
                self._history.popleft()
            return
        n = self._n()
        if self._ceiling is not None:
            w = self._window_bounds(now)[0]
            self._per_window[w] = self._per_window.get(w, 0) + 1
        if self._aligned:
            k, start = self._window_bounds(now)
            if k != self._window:
                first = self._window < 0
                if self._ceiling is not None and self._window >= 0:
                    self._record(self._window_use(math.inf, since if waited else None))
                # A window right after a busy one keeps its slots where the window puts them (from the
                # start of its sending zone): a late first release (a late timer, a stalled loop) is then
                # caught up instead of shifting every later slot towards the window's end. After an idle
                # window (an idle stretch, a pause) the slots count from the first release, so a window entered
                # mid-way is evenly spaced, not crammed into what is left of it (the end of a 429's pause
                # included: the server asked for less, not for a burst).
                busy = not first and self._window == k - 1 and not after_pause
                self._anchor = min(now, start + self._lead) if busy else now
                # The run's first window is the exception: its slots are spread over the first half of what
                # is left of its zone, so a run that begins mid-window still sends its N there (evenly, not as
                # a burst; the second half of what is left is room to catch up, as in every window). Each
                # request the first window leaves unsent puts the run's end a spacing later.
                # A run that begins in the edge of its first window, past the zone's end (see earliest()),
                # spreads them over the first half of what is left of the edge, as closely as anywhere.
                zone_end = start + self._period - self._tail
                zone_left = zone_end - now
                slowest = self._learner.slowest if self._learn else None
                edge_left = start + self._period - self._lead - slowest - now if slowest is not None else 0.0
                self._spill = self._carried() if self._window == k - 1 else 0  # (the window before's)
                self._w_first = first and not after_pause
                left = zone_left if zone_left > 0 else edge_left
                self._w_span = left if self._w_first and left > 0 else math.inf
                self._prev_late_from, self._prev_edge_from = self._late_from, self._edge_from
                self._late_from = start + self._lead + (self._period - self._lead - self._tail) * (1 - _SLACK)
                self._edge_from = zone_end if self._w_first else math.inf
                self._window, self._count, self._answered, self._late_count = k, 0, 0, 0
                self._w_late, self._w_n, self._w_tail = 0.0, n, self._tail
            elif after_pause:
                self._anchor = max(self._anchor, now - self._count * self._slot_spacing(n))
            if waited and since is not None:
                slot = self._anchor + self._count * self._slot_spacing(n)
                self._w_late = max(self._w_late, now - max(slot, since))
            self._count += 1
            self._late_count += now >= self._late_from
            if self._w_first:
                # Past the zone's end in force now (the learned margin may have moved it): in the edge.
                zone_end = self._window_bounds(now)[1] + self._period - self._tail
                if now >= zone_end - _EPS:
                    self._edge_from = min(self._edge_from, zone_end)
        else:
            spacing = (self._period + self._tail) / n
            # On time (or a little late): keep the grid, so timer lateness is not carried forward.
            # Idle before this release: the grid restarts from now.
            base = self._grid if now - self._grid < spacing / 2 else now
            self._grid = base + spacing
        while len(self._history) > n:
            self._history.popleft()

    def _window_use(self, upto: float, waiting_since: float | None) -> WindowUse:
        """The current window's record, its slots due before ``upto`` (inf: the window is over) counted.
        ``waiting_since``: since when the attempt released next had waited (None: it did not wait)."""
        n = max(self._w_n, self._count)
        start = self._window * self._period - (self._wall_offset or 0.0)
        zone_end = start + self._period - self._w_tail
        spacing = self._slot_spacing(n)
        # The pauses over this window (usually none).
        pauses = [(a, b) for a, b in self._pauses if a < zone_end and b > start]
        # Counted by index ranges, not slot by slot: a generous budget (say a million per second) has a
        # million slots per window, and this runs at every window's end.
        anchor = self._anchor

        def first_at(x: float) -> int:
            """The smallest slot index whose time is at or after ``x``."""
            j = math.ceil((x - anchor) / spacing)
            while anchor + (j - 1) * spacing >= x:
                j -= 1
            while anchor + j * spacing < x:
                j += 1
            return j

        lo = self._count
        hi = max(lo, n - self._spill)
        carried = n - hi
        idle = waiting = paused = 0
        limit = min(zone_end, upto)
        due = min(hi, max(lo, first_at(limit))) if hi > lo else lo
        if upto >= zone_end:
            # Beyond the zone: the window's slots were counted from a release after an idle stretch or after
            # a pause. (While the window is open, its slots not due yet are not counted.)
            if pauses:
                paused += hi - due
            else:
                idle += hi - due
        # Slots due in the zone and not released: in a pause, waited for, or idle.
        in_pause: list[tuple[int, int]] = []
        for a, b in sorted(pauses):
            i, k = max(lo, first_at(a)), min(due, first_at(b))
            if i >= k:
                continue
            if in_pause and i <= in_pause[-1][1]:
                in_pause[-1] = (in_pause[-1][0], max(in_pause[-1][1], k))
            else:
                in_pause.append((i, k))
        paused_due = sum(k - i for i, k in in_pause)
        waiting_due = 0
        if waiting_since is not None and due > lo:
            w0 = max(lo, first_at(waiting_since))
            waiting_due = max(0, due - w0) - sum(max(0, k - max(i, w0)) for i, k in in_pause)
        paused += paused_due
        waiting += waiting_due
        idle += (due - lo) - paused_due - waiting_due
        return WindowUse(
            window=self._window,
            allowed=n,
            released=self._count,
            idle=idle,
            waiting=waiting,
            paused=paused,
            carried=carried,
            late_max=self._w_late,
            margin=self._w_tail,
        )

    def _open_window_use(self) -> tuple[WindowUse, ...]:
        if not (self._aligned and self._ceiling is not None and self._window >= 0 and self._time is not None):
            return ()
        return (self._window_use(self._now(), None),)

    def _record(self, use: WindowUse) -> None:
        self._w_records.append(use)
        self._log.debug(
            "budget.window",
            window=use.window,
            allowed=use.allowed,
            released=use.released,
            idle=use.idle,
            waiting=use.waiting,
            paused=use.paused,
            carried=use.carried,
            late_max_ms=round(use.late_max * 1000, 1),
            margin_ms=round(use.margin * 1000, 1),
        )

    def _note_starved(self, now: float) -> None:
        if not math.isfinite(self._last_release):
            return  # the run's first request: nothing was waited for before it
        k = self._window_bounds(now)[0]
        if k in self._starved and self._window_bounds(self._last_release)[0] == k:
            # Whatever the free slot's time (from the last release on), only this window could be added, and
            # it is there already: a budget far above what is sent marks its windows starved at every request.
            return
        free_since = self.earliest(self._last_release)
        if now - free_since > self._nominal_spacing():
            first, last = self._window_bounds(free_since)[0], self._window_bounds(now)[0]
            self._starved.update(range(first, last + 1))

    # -- learning from answers ---------------------------------------------------------------------------

    def on_rate_limited(self, retry_after: float | None, remaining: int | None = None) -> float:
        """A 429 came back: pause (``Retry-After`` when usable, capped at ``max_pause``; else until the window
        resets), and count it towards the window's share of 429s. Returns the pause in seconds."""
        now = self._now()
        self._answer_released = None  # (read by on_success only)
        self._rate_limited += 1
        if retry_after is not None and retry_after > 0 and math.isfinite(retry_after):
            pause = min(retry_after, self._max_pause)
        else:
            pause = self._until_window_reset(now)
        if self._rate is None:
            # Discovery: the rate that just failed, a little lower, is our first estimate.
            seen = sum(1 for t in self._history if t > now - self._discover_period)
            self._rate = max(1.0, seen * self._decrease)
            self._period = self._discover_period
            self._forget_window()
            self._history.clear()
            self._eval_window = None
        else:
            self._count_answer(now, limited=True)
        self._pause_until(now, now + pause)
        self._changed()
        return pause

    def on_success(self, remaining: int | None = None, reset_after: float | None = None) -> None:
        """A request went through. ``remaining`` is the server's ``X-RateLimit-Remaining``: at 0 the budget
        waits for the window reset instead of collecting a 429 first — ``reset_after`` seconds when the
        connector knows when the *platform's* window resets (capped at ``max_pause``), else (aligned, or
        discovering) until this budget's own window ends — unless the answer (:meth:`answered`, reported just
        before) is to a request released in an earlier window: that window is over."""
        now = self._now()
        changed = False
        exhausted = remaining is not None and remaining <= 0
        released, self._answer_released = self._answer_released, None
        if exhausted and reset_after is None and released is not None:
            # The answer to a request released in an earlier window (a slow answer, read after the edge) says
            # that window was used up: it has ended, and pausing now would cost the next one whole. (A request
            # the server counted in this window instead is held against it by the late-release rule.)
            exhausted = self._window_bounds(released + _EPS)[0] == self._window_bounds(now)[0]
        if exhausted and reset_after is not None and reset_after > 0 and math.isfinite(reset_after):
            # The platform's window may be longer than ours (100 per minute against a budget per second):
            # nothing more goes through until it resets, so sending on our own period only collects 429s.
            changed = self._pause_until(now, now + min(reset_after, self._max_pause))
        elif exhausted and (self._aligned or self._rate is None):
            changed = self._pause_until(now, now + self._until_window_reset(now))
        if self._rate is not None:
            changed = self._count_answer(now, limited=False) or changed
        if changed:
            self._changed()

    def observe(self, latency: float) -> None:
        """One release-to-answer time: the learned margin before a window's end follows their p99, and the
        answer is counted for its release's window (:meth:`answered`)."""
        now = self._now()
        self.answered(now - latency, now)
        self.learn(latency)

    def learn(self, latency: float) -> None:
        """One release-to-answer time for the learned margin only."""
        if self._learn and self._learner.observe(latency):
            self.follow_learner()

    def answered(self, released_at: float, received: float) -> None:
        """An answer to a request released at ``released_at`` was received at ``received`` (at the latest). A
        release answered before its window ends surely arrived in it; the others released late in it may have
        arrived in the next window, where each takes a slot (see :meth:`earliest`) — until its answer turns
        out to have been received before the edge after all (read late by a stalled loop)."""
        self._answer_released = released_at
        if not self._aligned or self._rate is None:
            return
        self._answers_seen = True  # from now on, a release with no answer is one that may have arrived late
        k = self._window_bounds(released_at + _EPS)[0]
        if self._window_bounds(max(received, released_at) + _EPS)[0] != k:
            return  # received after its window's edge: it may have been counted in the next one
        current = k == self._window
        if not (current or (k == self._window - 1 and self._spill > 0)):
            return
        if released_at < (self._late_from if current else self._prev_late_from) - _EPS:
            return  # a regular release: it never took a slot of the next window
        # Released in the first window's edge: its answer must have come ``lead`` before the edge, so it surely
        # arrived in its window even if the server's clock is ahead of ours by up to ``lead``.
        in_edge = released_at >= (self._edge_from if current else self._prev_edge_from) - _EPS
        if (
            in_edge
            and received > self._window_bounds(released_at + _EPS)[1] + self._period - self._lead + _EPS
        ):
            return
        if current:
            self._answered += 1
            if self._count >= self._n():
                self._changed()  # the next window's room grew: a timer may be set past it
        else:
            self._spill -= 1  # held for nothing: it arrived in its own window
            self._changed()

    def follow_learner(self) -> None:
        """Take the margin from the learner's p99 (when this meter learns its margin and the p99 is known)."""
        p99 = self._learner.p99
        if not self._learn or p99 is None:
            return
        # Release-to-answer is the round trip plus the server's time: an upper bound of release-to-arrival,
        # which is what must fit before the window's end. A little on top for timer lateness.
        self._tail = min(self._max_margin, max(MIN_MARGIN, p99 + 0.005))
        if self._fixed_lead is None:
            self._lead = self._tail / 4

    def _pause_until(self, now: float, until: float) -> bool:
        if until <= self._paused_until:
            return False
        self._paused_seconds += until - max(now, self._paused_until)
        self._pauses.append((max(now, self._paused_until), until))
        self._paused_until = until
        return True

    def _count_answer(self, now: float, *, limited: bool) -> bool:
        """Count an answer in its window; on entering a new window, judge the last one. True if the rate
        changed. One 429 among many answers changes nothing: only a window whose share of 429s is above
        ``limited_share`` lowers the rate (x ``decrease``), and ``clean_windows`` windows in a row without
        any raise it again (x (1 + ``increase``), at least one request), up to the configured budget."""
        k = self._window_bounds(now)[0]
        changed = False
        if k != self._eval_window:
            changed = self._judge_window()
            self._eval_window, self._answers, self._limited = k, 0, 0
        self._answers += 1
        self._limited += limited
        return changed

    def _judge_window(self) -> bool:
        if self._rate is None or self._answers == 0:
            return False
        if self._limited > self._limited_share * self._answers:
            self._clean = 0
            new = max(1.0, self._rate * self._decrease)
            if new < self._rate:
                self._decreases += 1
            self._rate = new
            return True
        if self._limited:
            self._clean = 0
            return False
        self._clean += 1
        if self._clean < self._clean_windows:
            return False
        self._clean = 0
        raised = max(self._rate * (1 + self._increase), self._rate + 1)
        new = raised if self._ceiling is None else min(self._ceiling, raised)
        if new == self._rate:
            return False
        self._rate = new
        return True
