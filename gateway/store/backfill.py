"""Background backfills: what a migration needs done over the usage history, done while serving.

A schema step is bounded (gateway/store/migrations.py); filling a new rollup table from
years of rows is not, so it is a *backfill*, run by every serving process after it listens
(`BackfillRunner`, started by proxy.py) or to completion by ``./gw migrate --backfill``:

* **Registered in one line.** A backfill names the migration that needs it and a chunk
  function ``(dialect, lo, hi) -> [statements]`` that processes the usage rows with
  ``lo <= id < hi`` (literal integers in the SQL), one line in `BACKFILLS` below (or
  `register`, as tests/upgrade_launcher.py does)::

      Backfill("test_rollup_models", 20, rollup_chunk((TEST_FAMILY,)), ("test_rollup_models_daily",)),

  (`rollup_chunk(families)` builds the chunk function of a new rollup family.)
* **History is a fixed id range.** In the transaction that applies the migration (the same
  one that creates the table and the trigger or statement that keeps it up to date from
  then on), the store records the backfill in ``gw_backfills`` (migration 20) with
  ``[lo, hi)``: the ids of the rows already there. Rows written later are the live path's;
  the backfill never sees them, so nothing is counted twice. A new database registers an
  empty range, recorded finished: nothing to do.
* **Migrations older than the framework.** A migration before 20 (`BACKFILLS_IN`) cannot
  register in its own transaction: gw_backfills does not exist yet. Its backfill is
  registered in migration 20's transaction instead, over the range its migration recorded
  (`Backfill.range_sql`): the latency histogram's is ``[min usage id, live_from_id)``, the
  boundary migration 18 wrote beside its trigger, so ids at or above it (live) are never
  backfilled whenever 20 runs after 18. For the same reason such a backfill is registered
  at any later migrate that finds it missing (a store migrated by a release that did not
  know it); one over every row (no `range_sql`) only with its own migration (`to_register`).
* **Chunked, newest first, resumable.** Each step is one transaction: lock the backfill's
  row, run the chunk over ``[max(lo, next_id - rows), next_id)``, move ``next_id`` down and
  record the rows done and the oldest time covered. The progress is committed with the
  chunk's writes, so a crash or SIGKILL resumes exactly where the last commit left it,
  never counting a chunk twice. Newest first: the recent windows most reports read are
  exact first (``covered_since``).
* **Once across processes.** The step holds a lease (owner, until) on the row; another
  process finds it held and waits, taking over only once it expires (its holder died). The
  row lock makes two steps of one backfill impossible at once even without the lease.
* **Throttled.** A chunk aims at `CHUNK_SECONDS` of database time (10 ms on SQLite, 50 ms on
  PostgreSQL; its size adapts to the measured time, so a loaded database gets smaller chunks), and after each the runner sleeps so that backfills use at most `pace` of
  the wall clock (``store.backfill_pace``): the requests' transactions never queue behind
  more than one short chunk. Measured in bench/upgrade_bench.py.

While one runs, ``/admin/metrics`` and the dashboard say "backfilling, 42%" (`summary`).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import structlog

from gateway.store import rollup as usage_rollup

log = structlog.get_logger("gateway.backfill")

# Database time per chunk the size adapts to, while serving. SQLite: what a reservation may
# wait behind one chunk at most (a write transaction holds the file). PostgreSQL: a chunk
# locks only the rollup rows it adds to (the live usage inserts, written behind the
# answers, may wait on those), so longer chunks, less overhead per row. ./gw migrate
# --backfill, with no requests to protect, takes bigger ones still.
CHUNK_SECONDS = {"sqlite": 0.01, "postgres": 0.05}
CHUNK_SECONDS_ALONE = 0.25
FIRST_ROWS = 500  # rows of the first chunk
MIN_ROWS, MAX_ROWS = 100, 50_000
LEASE_SECONDS = 30.0
# Rows per second at pace 1 with the serving chunk sizes, the main and per-user rollups
# rebuilt (a heavy backfill): bench/storage_growth.py, 1,000,000 rows on this shared 2-core
# VM. ./gw migrate --plan's estimate divides by it (and by the pace while serving), or by
# a backfill's own `rows_per_second`.
ROWS_PER_SECOND = {"sqlite": 7_000, "postgres": 9_700}

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Backfill:
    name: str  # [a-z][a-z0-9_]*: its row in gw_backfills
    migration: int  # registered in the transaction applying this migration (see to_register)
    chunk: Callable[[str, int, int], list[str]]  # (dialect, lo, hi) -> statements over lo <= id < hi
    tables: tuple[str, ...] = ()  # what it fills: reports over them say when they are partial
    # The ids it covers: a SELECT of one row (lo, hi), read in the registering transaction.
    # None: every usage row there then. A migration that recorded its own boundary (the
    # first id its live path keeps) names it here.
    range_sql: str | None = None
    # Its rows per second at pace 1 ({dialect: rate}), for ./gw migrate --plan's estimate;
    # None: ROWS_PER_SECOND (a heavy one's).
    rows_per_second: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"backfill name {self.name!r}: lower-case letters, digits and _")


def rollup_chunk(families: tuple[usage_rollup.Family, ...]) -> Callable[[str, int, int], list[str]]:
    """The chunk function of new rollup families (gateway/store/rollup.py): the rows of the
    id range added to them, as the live path adds each new row."""
    def chunk(dialect: str, lo: int, hi: int) -> list[str]:
        return usage_rollup.backfill(dialect, where=f"id >= {int(lo)} AND id < {int(hi)}", families=families)
    return chunk


# The registry: one line per backfill (its name, the migration that needs it, its chunk
# function, the tables it fills, where its range comes from when not every row there).
BACKFILLS: list[Backfill] = [
    # The fine latency histogram's history (gateway/store/rollup.py, "The fine histogram"):
    # the rows below the boundary migration 18 recorded.
    Backfill("latency_histogram", usage_rollup.HIST_IN, usage_rollup.hist_backfill_chunk,
             tuple(usage_rollup.HIST_TABLES.values()), range_sql=usage_rollup.HIST_HISTORY_RANGE,
             # bench/latency_backfill_bench.py, 1,000,000 seed rows (one workspace), serving chunks
             rows_per_second={"sqlite": 300_000, "postgres": 170_000}),
]

# The migration that creates gw_backfills. A backfill of an earlier migration (written before
# the framework) is registered in this one's transaction (or a later migrate's), over the
# range its own migration recorded (its `range_sql`): the live path has every later row.
BACKFILLS_IN = 20


def to_register(applied: list[int], before: Iterable[int] = (), registered: Iterable[str] = ()) -> list[Backfill]:
    """The backfills a migration run registers (in its transaction): `applied`, the
    migrations it applied; `before`, those applied earlier; `registered`, the names already
    in gw_backfills. A backfill is registered with its migration (every row there then is
    history), or, when its migration came first (before gw_backfills existed, or before
    this release knew the backfill), later, if it has a `range_sql`: the boundary its
    migration recorded beside the live path, so the range is exact whenever it is read. A
    backfill over every row (no `range_sql`) registered later would count the rows the live
    path already has: never. A second registration changes nothing."""
    known = set(applied) | set(before)
    if BACKFILLS_IN not in known:
        return []
    registered = set(registered)
    return [b for b in BACKFILLS if b.name not in registered
            and (b.migration in applied or (b.range_sql is not None and b.migration in known))]


def register(backfill: Backfill) -> Backfill:
    """Add (or replace, by name) a backfill; returns it."""
    BACKFILLS[:] = [b for b in BACKFILLS if b.name != backfill.name] + [backfill]
    return backfill


def by_name(name: str) -> Backfill | None:
    return next((b for b in BACKFILLS if b.name == name), None)


def registration_sql(dialect: str, backfill: Backfill, now: float) -> str:
    """The statement recording `backfill` over its range (`range_sql`; by default the rows
    there now), run in the migration's transaction. An empty range is recorded finished:
    nothing to do. A second registration changes nothing."""
    now = repr(float(now))
    source = backfill.range_sql or EVERY_ROW
    return ("INSERT INTO gw_backfills (name, migration, lo, hi, next_id, done_rows, registered_at, finished_at)"
            f" SELECT '{backfill.name}', {int(backfill.migration)}, r.lo, r.hi, r.hi, 0, {now},"
            f" CASE WHEN r.lo >= r.hi THEN {now} END FROM ({source}) AS r"
            " WHERE true ON CONFLICT (name) DO NOTHING")


EVERY_ROW = "SELECT COALESCE(MIN(id), 1) AS lo, COALESCE(MAX(id) + 1, 1) AS hi FROM ai_usage_logs"


STATE_COLUMNS = ("name", "migration", "lo", "hi", "next_id", "done_rows", "covered_since", "lease_owner",
                 "lease_until", "registered_at", "started_at", "finished_at")


def percent(state: dict[str, Any]) -> float:
    span = state["hi"] - state["lo"]
    if state["finished_at"] is not None or span <= 0:
        return 100.0
    return min(99.9, round(100.0 * (state["hi"] - state["next_id"]) / span, 1))


def summary(states: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What /admin/metrics and the dashboard show: None when nothing is being backfilled,
    else the overall percentage, a one-line note and each unfinished backfill."""
    running = [s for s in states if s["finished_at"] is None]
    if not running:
        return None
    total = sum(max(s["hi"] - s["lo"], 0) for s in running)
    done = sum(max(s["hi"] - s["next_id"], 0) for s in running)
    overall = min(99.9, round(100.0 * done / total, 1)) if total else 0.0
    items = []
    for s in running:
        backfill = by_name(s["name"])
        items.append({"name": s["name"], "migration": s["migration"], "percent": percent(s),
                      "rowsDone": s["done_rows"], "coveredSince": s["covered_since"],
                      "tables": list(backfill.tables) if backfill else []})
    oldest = min((s["covered_since"] for s in running if s["covered_since"] is not None), default=None)
    note = f"backfilling, {overall:g}%"
    tables = sorted({t for i in items for t in i["tables"]})
    if tables:
        note += f": {', '.join(tables)} " + (f"complete only from {usage_iso(oldest)} on" if oldest
                                            else "without the history yet")
    return {"state": "backfilling", "percent": overall, "note": note, "backfills": items}


def usage_iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def next_rows(rows: int, took: float, target: float) -> int:
    """The next chunk's size: toward `target` seconds of database time, at most doubling."""
    if took <= 0:
        return min(MAX_ROWS, rows * 2)
    return max(MIN_ROWS, min(MAX_ROWS, rows * 2, int(rows * target / took)))


class BackfillRunner:
    """Runs every registered, unfinished backfill of `store` to its end, a chunk at a time,
    using at most `pace` (0 < pace <= 1) of the wall clock. `on_progress(state)` after each chunk."""

    def __init__(self, store: Any, *, pace: float = 0.25, start_delay: float = 0.5, lease: float = LEASE_SECONDS,
                 owner: str | None = None, on_progress: Callable[[dict[str, Any]], None] | None = None,
                 chunk_seconds: float | None = None) -> None:
        if not 0 < pace <= 1:
            raise ValueError("pace must be in (0, 1]")
        self.store = store
        self.pace = pace
        self.chunk_seconds = chunk_seconds or CHUNK_SECONDS.get(getattr(store, "dialect", ""), 0.01)
        self.start_delay = start_delay
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.on_progress = on_progress
        self.rows = FIRST_ROWS
        self._warned: set[str] = set()

    async def run(self) -> None:
        """Until nothing is left (returns), or cancelled. Store errors are logged and retried."""
        await asyncio.sleep(self.start_delay)
        while True:
            try:
                if not await self._round():
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — a database hiccup: the progress is committed, try again later
                log.exception("backfill_step_failed", hint="retried; the progress made so far is kept")
                await asyncio.sleep(5.0)

    async def _round(self) -> bool:
        """One chunk of each unfinished backfill; False when none is left."""
        states = await self.store.backfill_states()
        pending = []
        for state in states:
            if state["finished_at"] is not None:
                continue
            backfill = by_name(state["name"])
            if backfill is None:  # a newer release's: it runs it
                if state["name"] not in self._warned:
                    self._warned.add(state["name"])
                    log.info("backfill_unknown", name=state["name"], hint="registered by a newer release; left to it")
                continue
            pending.append(backfill)
        if not pending:
            return False
        progressed = False
        for backfill in pending:
            started = time.monotonic()
            state = await self.store.backfill_step(backfill, self.owner, self.rows, lease=self.lease)
            took = time.monotonic() - started
            if state is None:
                continue  # another process holds it
            progressed = True
            self.rows = next_rows(self.rows, took, self.chunk_seconds)
            if state["finished_at"] is not None:
                log.info("backfill_finished", name=backfill.name, rows=state["done_rows"])
            if self.on_progress is not None:
                self.on_progress(state)
            await asyncio.sleep(took * (1 - self.pace) / self.pace)
        if not progressed:
            await asyncio.sleep(min(self.lease / 3, 5.0))
        return True


def runner_ctx(get_store: Callable[[], Any], pace: float) -> Callable[[Any], Any]:
    """An aiohttp cleanup context running the backfills in the background (none when
    `pace` is 0); cancelled at shutdown (the progress is committed per chunk)."""
    async def ctx(app: Any) -> Any:
        task = None
        if pace > 0:
            task = asyncio.create_task(BackfillRunner(get_store(), pace=pace).run())
        yield
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return ctx
