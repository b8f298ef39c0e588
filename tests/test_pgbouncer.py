"""The PostgreSQL store behind PgBouncer in transaction pooling mode.

Each test starts Debian's `pgbouncer` (installed by .ci/run) on a free port, in front of the
test database, and runs store tests from tests/test_store.py through it: successive
transactions of one client land on different server connections, so any session state
(a prepared statement kept across transactions, a session setting, a session advisory
lock) would break them. The store runs with `pgbouncer=true`: no statement cache, and the
schema comes from PgBouncer's connect_query rather than a startup parameter.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time

import asyncpg
import pytest
import pytest_asyncio

from gateway.config import StoreConfig
from gateway.store import open_store
from tests import test_store as shared
from tests.test_store import PG_URL

# Store tests collected here again, so they run through PgBouncer (their `store` and
# `user` fixtures take this module's `store_url`).
store, user = shared.store, shared.user
test_reserve_settle_refund_happy_paths = shared.test_reserve_settle_refund_happy_paths
test_energy_errors_change_nothing = shared.test_energy_errors_change_nothing
test_settle_and_refund_are_idempotent = shared.test_settle_and_refund_are_idempotent
test_concurrent_settles_and_refunds_pay_back_once = shared.test_concurrent_settles_and_refunds_pay_back_once
test_settle_many_settles_open_reservations_once = shared.test_settle_many_settles_open_reservations_once
test_concurrent_settle_many_and_refunds_pay_back_once = shared.test_concurrent_settle_many_and_refunds_pay_back_once
test_stale_reservations = shared.test_stale_reservations
test_200_concurrent_reserves_on_one_store = shared.test_200_concurrent_reserves_on_one_store
test_lazy_refill = shared.test_lazy_refill
test_concurrent_refill_happens_once = shared.test_concurrent_refill_happens_once
test_idempotency_key_states = shared.test_idempotency_key_states
test_concurrent_begin_idempotent_claims_once = shared.test_concurrent_begin_idempotent_claims_once
test_usage_insert_batch_and_duplicates = shared.test_usage_insert_batch_and_duplicates
test_500_concurrent_mixed_energy_operations = shared.test_500_concurrent_mixed_energy_operations
test_reservations_of_one_loop_turn_equal_one_by_one_on_each_backend = \
    shared.test_reservations_of_one_loop_turn_equal_one_by_one_on_each_backend

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pgbouncer(schema: str) -> tuple[subprocess.Popen, int, str]:
    """A PgBouncer (pool_mode=transaction, trust) for db `test` on 127.0.0.1:5432, whose
    server connections have search_path `schema`. Returns (process, port, its directory)."""
    if PGBOUNCER is None:
        pytest.skip("pgbouncer not installed (apt-get install -y pgbouncer)")
    port = _free_port()
    # Not under tmp_path: PgBouncer refuses to run as root, and the user it switches to must
    # be able to read its files.
    workdir = tempfile.mkdtemp(prefix="pgbouncer-")
    os.chmod(workdir, 0o755)
    auth = os.path.join(workdir, "users.txt")
    with open(auth, "w") as f:
        f.write('"postgres" ""\n')
    ini = os.path.join(workdir, "pgbouncer.ini")
    with open(ini, "w") as f:
        f.write(f"""[databases]
test = host=127.0.0.1 port=5432 dbname=test connect_query='SET search_path TO {schema}'

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {auth}
pool_mode = transaction
default_pool_size = 4
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
""")
    for path in (auth, ini):
        os.chmod(path, 0o644)
    command = [PGBOUNCER, ini]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited: {process.stderr.read().decode(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port, workdir
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("pgbouncer did not listen within 10 s")


@pytest_asyncio.fixture
async def store_url():
    """A store URL through a fresh PgBouncer, for an empty schema of the test database."""
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")
    await conn.close()
    schema = f"test_pgb_{secrets.token_hex(6)}"
    process, port, workdir = start_pgbouncer(schema)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/test?schema={schema}&pgbouncer=true"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.mark.asyncio
async def test_the_store_runs_with_no_statement_cache_behind_pgbouncer(store_url):
    async with open_store(store_url) as s:
        assert s.pgbouncer and s.statement_cache_size == 0
        ws = await s.create_workspace("acme")
        assert (await s.get_workspace("acme")).id == ws.id


@pytest.mark.asyncio
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
