"""Directory: who a key belongs to and what their workspace looks like, cached.

A request must not touch the database to learn who is calling. Lookups are cached for
`auth.cache_ttl` seconds (default 300, like the old in-app ConfigService). An admin change
made through this process (revoke, tier change, workspace settings) invalidates the
affected entries at once; other processes are told by gateway/change_feed.py (within
~0.5 s on SQLite, at once on PostgreSQL); the TTL is only the fallback.

Unknown keys are cached too (briefly, `NEGATIVE_TTL`) so a flood of bad keys cannot
turn into a flood of database queries.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from gateway.store.base import StoreError, StoreUnavailable

T = TypeVar("T")

NEGATIVE_TTL = 5.0


async def _answered(lookup: Awaitable[T]) -> T:
    """The store's answer; a store that could not answer at all (connection refused, reset)
    is StoreUnavailable, which the chain turns into a 503 that says so (fails closed)."""
    try:
        return await lookup
    except StoreError:
        raise
    except (OSError, asyncio.TimeoutError) as exc:
        raise StoreUnavailable(f"the store did not answer: {type(exc).__name__}") from exc


def key_digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class _Entry:
    value: Any
    expires: float


class Directory:
    def __init__(self, store: Any, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self._keys: dict[str, _Entry] = {}  # sha256(key) -> KeyIdentity | None
        self._workspaces: dict[str, _Entry] = {}  # workspace id -> Workspace | None
        self._end_users: dict[tuple[str, str], _Entry] = {}  # (workspace id, app's id) -> User
        self._budgets: dict[str, _Entry] = {}  # workspace id -> [Budget] (gateway/budgets.py)
        # Bumped by every forget_*: a lookup that was already reading the store when an
        # admin change landed must not put its (now stale) answer back into the cache,
        # or a key revoked "at once" would keep working for a whole TTL.
        self._generation = 0

    async def identity(self, plaintext: str) -> Any:
        """The KeyIdentity for a key, or None when unknown. Revoked keys are returned
        (with .revoked) so the caller can say so."""
        digest = key_digest(plaintext)
        now = self.clock()
        entry = self._keys.get(digest)
        if entry is not None and entry.expires > now:
            return entry.value
        generation = self._generation
        value = await _answered(self.store.lookup_key(plaintext))
        if generation != self._generation:
            return value  # answer this request, but do not cache what may be stale
        self._keys[digest] = _Entry(value, now + (self.ttl if value is not None else min(self.ttl, NEGATIVE_TTL)))
        if len(self._keys) > 100_000:  # bound memory under key-guessing floods
            self._evict(self._keys, now)
        return value

    async def workspace(self, workspace_id: str) -> Any:
        now = self.clock()
        entry = self._workspaces.get(workspace_id)
        if entry is not None and entry.expires > now:
            return entry.value
        generation = self._generation
        value = await _answered(self.store.get_workspace(workspace_id))
        if generation == self._generation:
            self._workspaces[workspace_id] = _Entry(value, now + self.ttl)
        return value

    async def budgets(self, workspace_id: str) -> list[Any]:
        """Every budget of the workspace (its own, its users', its keys'); a budget change
        is published as a change of the workspace (gateway/admin/operations.py)."""
        now = self.clock()
        entry = self._budgets.get(workspace_id)
        if entry is not None and entry.expires > now:
            return entry.value
        generation = self._generation
        value = await _answered(self.store.list_budgets(workspace_id))
        if generation == self._generation:
            self._budgets[workspace_id] = _Entry(value, now + self.ttl)
            if len(self._budgets) > 100_000:
                self._evict(self._budgets, now)
        return value

    async def end_user(self, workspace_id: str, external_id: str,
                       start: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[Any, bool]:
        """The workspace's end user with the app's id, `(User, created)`: found, or created by
        the store with `await start()` (tier, energy, start_refill_period) on first sight."""
        cache_key = (workspace_id, external_id)
        now = self.clock()
        entry = self._end_users.get(cache_key)
        if entry is not None and entry.expires > now:
            return entry.value, False
        generation = self._generation
        user, created = await _answered(self.store.end_user(workspace_id, external_id, **await start()))
        if generation == self._generation:
            self._end_users[cache_key] = _Entry(user, now + self.ttl)
            if len(self._end_users) > 100_000:
                self._evict(self._end_users, now)
        return user, created

    @staticmethod
    def _evict(cache: dict[str, _Entry], now: float) -> None:
        for k in [k for k, e in cache.items() if e.expires <= now]:
            del cache[k]
        while len(cache) > 50_000:
            cache.pop(next(iter(cache)))

    # --- invalidation, called by admin operations in this process ---------------------

    def forget_user(self, user_id: str) -> None:
        self._generation += 1
        for ident in [i for i, e in self._end_users.items() if e.value.id == user_id]:
            del self._end_users[ident]
        for digest in [d for d, e in self._keys.items() if e.value is not None and e.value.user_id == user_id]:
            del self._keys[digest]

    def forget_key(self, key_id: str) -> None:
        self._generation += 1
        for digest in [d for d, e in self._keys.items() if e.value is not None and e.value.key_id == key_id]:
            del self._keys[digest]

    def forget_workspace(self, workspace_id: str) -> None:
        self._generation += 1
        self._workspaces.pop(workspace_id, None)
        self._budgets.pop(workspace_id, None)
        for ident in [i for i in self._end_users if i[0] == workspace_id]:
            del self._end_users[ident]
        for digest in [d for d, e in self._keys.items() if e.value is not None and e.value.workspace_id == workspace_id]:
            del self._keys[digest]

    def clear(self) -> None:
        self._generation += 1
        self._keys.clear()
        self._workspaces.clear()
        self._end_users.clear()
        self._budgets.clear()
