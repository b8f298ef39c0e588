"""The PostgreSQL store behind PgBouncer in transaction pooling mode.

The whole store suite runs through PgBouncer too: tests/test_store.py's `pgbouncer` variant
(tests/pgbouncer.py starts Debian's `pgbouncer` per test). Here: what is particular to
PgBouncer. The store runs with `pgbouncer=true`: no statement cache, and the schema comes
from PgBouncer's connect_query rather than a startup parameter.
"""

from __future__ import annotations

import pytest

from gateway.config import StoreConfig
from gateway.store import open_store
from tests import test_store

# test_store's fixture, its PgBouncer variant: a fresh PgBouncer for an empty schema.
store_url = test_store.store_url
through_pgbouncer = pytest.mark.parametrize("store_url", ["pgbouncer"], indirect=True)


@pytest.mark.asyncio
@through_pgbouncer
async def test_the_store_runs_with_no_statement_cache_behind_pgbouncer(store_url):
    async with open_store(store_url) as s:
        assert s.pgbouncer and s.statement_cache_size == 0
        ws = await s.create_workspace("acme")
        assert (await s.get_workspace("acme")).id == ws.id


@pytest.mark.asyncio
@through_pgbouncer
async def test_a_schema_pgbouncer_does_not_set_is_refused_at_open(store_url):
    """The schema cannot travel as a startup parameter through PgBouncer: a store whose
    ?schema= differs from what PgBouncer sets says so instead of writing elsewhere."""
    wrong = store_url.replace("?schema=", "?schema=x")
    with pytest.raises(RuntimeError, match="store.pgbouncer"):
        async with open_store(wrong):
            pass


@pytest.mark.parametrize("settings, cache", [({}, 100), ({"pgbouncer": True}, 0),
                                             ({"pgbouncer": True, "statement_cache_size": 20}, 20)])
def test_store_settings_reach_the_postgres_store(settings, cache):
    config = StoreConfig(url="postgresql://u@db:5432/gw", pool_max_size=3, timeout=1.5, **settings)
    s = open_store(config.url, **config.backend_options())
    assert (s.pool_max_size, s.timeout, s.pgbouncer, s.statement_cache_size) == (
        3, 1.5, settings.get("pgbouncer", False), cache)
