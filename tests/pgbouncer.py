"""A real PgBouncer (Debian's `pgbouncer`, installed by .ci/run) in front of the test database.

`pgbouncer_url(schema)` starts one in transaction pooling mode on a free port, whose server
connections have search_path `schema`, and yields a store URL through it (`pgbouncer=true`).
Successive transactions of one client land on different server connections, so any session
state the store kept (a prepared statement across transactions, a session setting, a
session advisory lock) would break the tests that run through it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit

import pytest

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pgbouncer(schema: str, pg_url: str) -> tuple[subprocess.Popen, int, str]:
    """A PgBouncer (pool_mode=transaction, trust) for `pg_url`'s database, whose server
    connections have search_path `schema`. Returns (process, port, its directory)."""
    if PGBOUNCER is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer not installed (.ci/run installs it)")
        pytest.skip("pgbouncer not installed (apt-get install -y pgbouncer)")
    server = urlsplit(pg_url)
    database = server.path.lstrip("/")
    port = _free_port()
    # Not under tmp_path: PgBouncer refuses to run as root, and the user it switches to must
    # be able to read its files.
    workdir = tempfile.mkdtemp(prefix="pgbouncer-")
    os.chmod(workdir, 0o755)
    auth = os.path.join(workdir, "users.txt")
    with open(auth, "w") as f:
        f.write(f'"{server.username or "postgres"}" ""\n')
    ini = os.path.join(workdir, "pgbouncer.ini")
    with open(ini, "w") as f:
        f.write(f"""[databases]
{database} = host={server.hostname} port={server.port or 5432} dbname={database} connect_query='SET search_path TO {schema}'

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
    log = os.path.join(workdir, "pgbouncer.log")
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall PgBouncer
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log, errors="replace") as f:
                raise RuntimeError(f"pgbouncer exited: {f.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port, workdir
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise RuntimeError("pgbouncer did not listen within 10 s")


@contextmanager
def pgbouncer_url(schema: str, pg_url: str) -> Iterator[str]:
    """A store URL for `schema` of `pg_url`'s database, through a PgBouncer that lives as
    long as the block."""
    process, port, workdir = start_pgbouncer(schema, pg_url)
    server = urlsplit(pg_url)
    try:
        yield (f"postgresql://{server.username or 'postgres'}@127.0.0.1:{port}{server.path}"
               f"?schema={schema}&pgbouncer=true")
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
