"""The endings journal: an answered request is billed even if the process dies right after.

Settlements and usage rows are written behind the answers, in batches (gateway/batcher.py):
0.1 s and 1 s of them live only in memory. A SIGKILL, an OOM kill or a power cut there
used to leave the reservations open (the sweeper later refunded them: free answers) and
the usage rows lost. So, before an answer leaves, the core appends what its endings will
write (each journaling plugin's `Plugin.journal(ctx)`: the energy plugin's settlement, the
accounting plugin's usage row) as one JSON line to a local append-only file. No fsync: a
write() is in the kernel's page cache, which survives the death of the process (not of the
machine: the window for that is the batches' own).

At start-up, before the plugins start, segments left by a dead process are replayed
(`Plugin.replay(records)`; both replays are idempotent in the store: a settled reservation
is not settled twice, a usage row is keyed by its request id), then deleted. A live
process holds an exclusive `flock` on its open segment, so several processes sharing a
directory (workers, PostgreSQL fleets on one host) never replay each other's.

Segments rotate every `ROTATE_SECONDS`; a closed segment is deleted once every request it
holds has run its endings and the write-behind batches holding them are in the database
(`flush_all`). A database outage therefore keeps the segments (and the protection) until
the writes go through. A clean shutdown deletes them after the final flush.

Measured (`make bench`, quick, same session): see the README's Performance section.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
import structlog

from gateway.money import json_default

log = structlog.get_logger("gateway.journal")

ROTATE_SECONDS = 5.0
_PREFIX = "endings-"


def journal_dir(store_url: str, configured: str | None) -> Path:
    """`store.journal_dir` when set; else beside the SQLite file, or per PostgreSQL URL
    under ./data/journal (two stores never share a journal)."""
    if configured:
        return Path(configured)
    if store_url.startswith("sqlite:///"):
        return Path(store_url[len("sqlite:///"):].split("?")[0] + ".journal")
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return Path("data") / "journal" / digest


class _Segment:
    __slots__ = ("path", "fd", "outstanding", "entries", "closed")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.outstanding = 0  # journaled requests whose endings have not run yet
        self.entries = 0
        self.closed = False


class EndingsJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._current: _Segment | None = None
        self._closed: list[_Segment] = []
        self._serial = 0
        self._task: asyncio.Task | None = None
        self.failed = False  # the last write failed (disk full, ...): logged, not fatal

    # --- the hot path ------------------------------------------------------------------

    def record(self, request_id: str, records: dict[str, Any]) -> _Segment | None:
        """Append one answered request's records; returns its segment (for `ended`)."""
        segment = self._current
        if segment is None:
            return None
        line = orjson.dumps({"request_id": request_id, "at": time.time(), "records": records},
                            default=json_default) + b"\n"  # a usage row's USD amounts: JSON numbers
        try:
            os.write(segment.fd, line)
        except OSError as exc:
            if not self.failed:
                log.error("journal_write_failed", path=str(segment.path), error=str(exc),
                          hint="answers are still billed by the write-behind, but a crash now could lose them")
            self.failed = True
            return None
        self.failed = False
        segment.outstanding += 1
        segment.entries += 1
        return segment

    @staticmethod
    def ended(segment: _Segment) -> None:
        """The request's endings ran: its writes are queued in the write-behind batches."""
        segment.outstanding -= 1

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rotate()

    def _rotate(self) -> None:
        self._serial += 1
        name = f"{_PREFIX}{os.getpid()}-{int(time.time() * 1000)}-{self._serial}-{secrets.token_hex(4)}.jsonl"
        # Locked under a name replay does not look at, then renamed: another process
        # starting up never finds this segment unlocked (and takes it for a dead one).
        hidden = self.directory / f".{name}"
        fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours: no other process replays it
        path = self.directory / name
        os.rename(hidden, path)
        if self._current is not None:
            self._current.closed = True
            self._closed.append(self._current)
        self._current = _Segment(path, fd)

    def start(self, flush_all: Callable[[], Awaitable[None]]) -> None:
        self._task = asyncio.ensure_future(self._retire_forever(flush_all))

    async def _retire_forever(self, flush_all: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(ROTATE_SECONDS)
            try:
                if self._current is not None and self._current.entries:
                    self._rotate()
                await self._retire(flush_all)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — keeping segments longer is safe; retry next turn
                log.exception("journal_retire_failed")

    async def _retire(self, flush_all: Callable[[], Awaitable[None]]) -> None:
        done = [s for s in self._closed if s.outstanding <= 0]
        if not done:
            return
        await flush_all()  # everything their endings queued is in the database now
        for segment in done:
            self._delete(segment)
            self._closed.remove(segment)

    async def close(self, flush_all: Callable[[], Awaitable[None]] | None, pending_writes: int) -> None:
        """Clean shutdown: every ending ran and the plugins flushed. With nothing left
        unwritten (`pending_writes == 0`) the segments go; otherwise they stay for the
        next start to replay."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        segments = [*self._closed, *([self._current] if self._current is not None else [])]
        self._closed, self._current = [], None
        for segment in segments:
            if pending_writes == 0 and segment.outstanding <= 0:
                self._delete(segment)
            else:
                os.close(segment.fd)  # kept, and unlocked: the next start replays it
                log.warning("journal_kept_for_replay", path=str(segment.path), pending_writes=pending_writes)

    @staticmethod
    def _delete(segment: _Segment) -> None:
        with contextlib.suppress(OSError):
            segment.path.unlink()
        with contextlib.suppress(OSError):
            os.close(segment.fd)

    # --- replay at start ---------------------------------------------------------------

    def dead_segments(self) -> list[Path]:
        """Segments no live process holds (their writer died, or shut down unclean)."""
        if not self.directory.is_dir():
            return []
        dead = []
        own = {s.path for s in self._closed} | ({self._current.path} if self._current else set())
        for path in sorted(self.directory.glob(f"{_PREFIX}*.jsonl")):
            if path in own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                dead.append(path)
            except BlockingIOError:
                pass  # a live process writes it
            finally:
                os.close(fd)
        return dead

    async def replay(self, replayers: dict[str, Callable[[list[Any]], Awaitable[None]]]) -> int:
        """Hand each dead segment's records to the plugin that wrote them; delete the
        segment once every replay succeeded. Returns the number of requests replayed."""
        replayed = 0
        for path in self.dead_segments():
            by_plugin: dict[str, list[Any]] = {}
            requests = 0
            for line in path.read_bytes().splitlines():
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line torn by the crash: its answer never left (written first)
                requests += 1
                for plugin, record in (entry.get("records") or {}).items():
                    by_plugin.setdefault(plugin, []).append(record)
            unknown = sorted(set(by_plugin) - set(replayers))
            if unknown:
                log.warning("journal_records_without_plugin", path=str(path), plugins=unknown,
                            hint="the plugin that journaled them is no longer configured")
            try:
                for plugin, records in by_plugin.items():
                    if plugin in replayers:
                        await replayers[plugin](records)
            except Exception:  # noqa: BLE001 — the store refused: keep the segment for the next start
                log.exception("journal_replay_failed", path=str(path), requests=requests,
                              hint="kept; replayed at the next start (replays are idempotent)")
                continue
            with contextlib.suppress(OSError):
                path.unlink()
            replayed += requests
            log.warning("journal_replayed", path=str(path), requests=requests,
                        note="answered requests of a process that died before writing their endings")
        return replayed
