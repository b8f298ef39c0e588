"""The container image, built and run here with podman (`make test-container`).

The Containerfile is built on a local stand-in for the official Python slim image (a
debootstrapped Debian bookworm with Debian's python3: deploy/container/local-base.sh; no image
registry is reachable from CI) and run on the host network against a fake upstream on
127.0.0.1, with a mounted config.yaml:

- the README's two calls (health, a chat completion) answer, with a key created by
  `podman run IMAGE users create ...` on the same /data volume;
- it runs as a non-root user on a read-only root filesystem, and its HEALTHCHECK passes;
- SIGTERM under load (through tini, PID 1) loses nothing: every answered request has its
  usage row, the container exits 0;
- the Kubernetes migration Job's command migrates a fresh PostgreSQL schema and exits, and
  the same image serves with PostgreSQL and Redis, two workers from GATEWAY_WORKERS.

Skipped unless GATEWAY_TEST_CONTAINER=1 (the make target sets it), and skipped with the reason
when podman cannot run containers on this machine. Environment: GATEWAY_TEST_BASE_IMAGE (a
base to use instead of building one), GATEWAY_TEST_IMAGE (the tag to build).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import redis
import yaml

from tests.conftest import PG_URL
from tests.fakes import Fault, FakeUpstream, free_port
from tests.test_shutdown import REQUESTS, fire

ROOT = Path(__file__).resolve().parent.parent
MASTER = "gw-master-container-0123456789"
BASE_IMAGE = os.environ.get("GATEWAY_TEST_BASE_IMAGE", "localhost/gateway-base:bookworm")
IMAGE = os.environ.get("GATEWAY_TEST_IMAGE", "localhost/ai-gateway:test")
IMAGE_MAX_MB = 600  # the local base is 176 MB of it; was 1.3 GB as a one-stage image
REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = [
    pytest.mark.skipif(os.environ.get("GATEWAY_TEST_CONTAINER") != "1",
                       reason="container tests run with `make test-container` (GATEWAY_TEST_CONTAINER=1)"),
    pytest.mark.timeout(900),  # the first test builds the base and the image
]


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    # crun and systemd's cgroup manager fail on hybrid-cgroup VMs like CI's: runc + cgroupfs.
    if "CONTAINERS_CONF" not in env and shutil.which("runc"):
        env["CONTAINERS_CONF"] = str(ROOT / "deploy" / "container" / "containers.conf")
    return env


def podman(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def skip_unless_podman_runs() -> None:
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install -y podman runc debootstrap)")
    info = podman("info", check=False, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def image() -> str:
    skip_unless_podman_runs()
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        if os.geteuid() != 0 or not shutil.which("debootstrap"):
            pytest.skip(f"no base image {BASE_IMAGE} and cannot build one (needs root and debootstrap)")
        built = subprocess.run([str(ROOT / "deploy" / "container" / "local-base.sh"), BASE_IMAGE],
                               env=podman_env(), capture_output=True, text=True, timeout=600)
        if built.returncode != 0:
            pytest.skip(f"cannot build the local base image (debootstrap): {built.stderr.strip()[-800:]}")
    probe = podman("run", "--rm", "--network", "host", BASE_IMAGE, "python3", "-c", "print('ok')", check=False)
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-800:]}")
    # pip inside the build reaches its registry only with this machine's config and CAs.
    mounts = [f"--volume={path}:{path}:ro" for path in ("/etc/pip.conf", "/etc/xdg/pip", "/etc/ssl/certs")
              if os.path.exists(path)]
    podman("build", "--format", "docker", "--network", "host", *mounts, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
           "--tag", IMAGE, "--file", "Containerfile", ".", cwd=ROOT, timeout=900)
    size_mb = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout) / 1e6
    print(f"\nimage {IMAGE}: {size_mb:.0f} MB (base {BASE_IMAGE}: "
          f"{int(podman('image', 'inspect', '--format', '{{.Size}}', BASE_IMAGE).stdout) / 1e6:.0f} MB)")
    assert size_mb < IMAGE_MAX_MB, f"the image grew to {size_mb:.0f} MB"
    return IMAGE


@pytest.fixture(scope="module")
def fake_upstream(server_thread):
    up = server_thread.run(FakeUpstream(reply="Hello from the fake upstream").start())
    yield up
    server_thread.run(up.stop())


@pytest.fixture
def volume():
    name = f"gw-test-{uuid.uuid4().hex[:10]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


def write_config(tmp_path: Path, upstream: FakeUpstream, store_url: str = "sqlite:///data/gateway.db",
                 **extra: Any) -> Path:
    config = {
        "server": {"shutdown_grace": 15},
        "store": {"url": store_url},
        "auth": {"master_key": MASTER, "default_tier": "pro"},
        "retries": {"max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.05},
        "models": [{"name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream"}}],
        "tiers": {"pro": {"models": ["*"]}},
        "energy": {"actions": {"ai_message": {"default": 2}}},
        **extra,  # no plugins: section: the standard chain, as shipped
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    return path


class Gateway:
    """A `podman run IMAGE serve` on the host network with a mounted config and a /data volume."""

    def __init__(self, image: str, config: Path, volume: str, *, env: dict[str, str] | None = None) -> None:
        self.image, self.config, self.volume = image, config, volume
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"gw-test-{uuid.uuid4().hex[:10]}"
        self.env = {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port), **(env or {})}

    def mounts(self) -> list[str]:
        return ["--volume", f"{self.config}:/etc/gateway/config.yaml:ro", "--volume", f"{self.volume}:/data"]

    def cli(self, *argv: str) -> str:
        """`podman run --rm IMAGE <argv>`: the gateway's CLI on the same config and volume."""
        done = podman("run", "--rm", "--read-only", "--network", "host", *self.mounts(), self.image, *argv)
        return done.stdout

    def start(self) -> "Gateway":
        env = [f"--env={k}={v}" for k, v in self.env.items()]
        podman("run", "--detach", "--name", self.name, "--read-only", "--network", "host", *env, *self.mounts(),
               self.image, "serve")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if podman("container", "inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() != "true":
                raise AssertionError(f"the gateway container exited at start-up:\n{self.logs()[-3000:]}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the gateway never became ready:\n{self.logs()[-3000:]}")

    def send_signal(self, sig: int) -> None:  # what tests.test_shutdown.fire calls mid-load
        podman("kill", "--signal", signal.Signals(sig).name, self.name)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *argv, check=check)

    def wait(self, timeout: float = 60) -> int:
        return int(podman("wait", self.name, timeout=timeout).stdout.strip())

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


def create_user(gateway: Gateway) -> dict[str, str]:
    gateway.cli("workspaces", "create", "acme")
    return json.loads(gateway.cli("users", "create", "--workspace", "acme", "--tier", "pro", "--energy", "1000",
                                  "--json"))


def volume_path(volume: str) -> Path:
    return Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())


def chat(gateway: Gateway, key: str) -> str:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}])
    client.close()
    return reply.choices[0].message.content


@pytest.fixture
def sqlite_gateway(image, fake_upstream, tmp_path, volume):
    gateway = Gateway(image, write_config(tmp_path, fake_upstream), volume)
    user = create_user(gateway)  # before the gateway: the CLI migrates the fresh volume's store
    gateway.start()
    yield gateway, user
    gateway.remove()


def test_the_readme_calls_answer_with_a_key_made_by_the_images_cli(sqlite_gateway):
    gateway, user = sqlite_gateway
    assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    assert httpx.get(gateway.url + "/health/ready", timeout=5).json()["status"] == "ready"
    assert chat(gateway, user["api_key"]) == "Hello from the fake upstream"
    refused = httpx.post(gateway.url + "/v1/chat/completions", headers={"Authorization": "Bearer gw-wrong"},
                         json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert "OK" in gateway.cli("check-config")


def test_it_runs_as_non_root_on_a_read_only_root_filesystem_with_state_under_data(sqlite_gateway):
    gateway, _ = sqlite_gateway
    assert gateway.exec("id", "-u").stdout.strip() == "10001"
    assert podman("container", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", gateway.name).stdout.strip() == "true"
    for path in ("/app/probe", "/opt/venv/probe", "/etc/gateway/probe"):
        denied = gateway.exec("touch", path, check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (path, denied.stderr)
    state = gateway.exec("ls", "/data").stdout.split()
    assert {"gateway.db", "gateway.db.journal"} <= set(state)  # the store and its endings journal
    # PID 1 is tini, the gateway its child: SIGTERM reaches the gateway (next test).
    assert gateway.exec("cat", "/proc/1/comm").stdout.strip() == "tini"


def test_the_images_healthcheck_passes_once_ready(sqlite_gateway):
    gateway, _ = sqlite_gateway
    assert "/health/ready" in podman("image", "inspect", "--format", "{{.HealthCheck.Test}}", gateway.image).stdout
    assert podman("healthcheck", "run", gateway.name, check=False).returncode == 0


def test_sigterm_under_load_loses_no_usage_row(image, fake_upstream, tmp_path, volume):
    """tests/test_shutdown.py's load, against the container: REQUESTS concurrent calls (half
    streamed), `podman kill --signal TERM` once most reached the upstream. Every answered
    request has one usage row, every reservation is closed, the container exits 0."""
    gateway = Gateway(image, write_config(tmp_path, fake_upstream), volume)
    user = create_user(gateway)
    gateway.start()
    try:
        fake_upstream.reset()
        fake_upstream.push(*[Fault.slow(0.4)] * REQUESTS)  # plenty in flight at SIGTERM
        fake_upstream.chunk_delay = 0.05
        statuses = asyncio.run(fire(gateway.url + "/v1", user["api_key"], fake_upstream, gateway))
        assert gateway.wait() == 0, gateway.logs()[-3000:]
    finally:
        fake_upstream.chunk_delay = 0
        fake_upstream.reset()
        logs = gateway.logs()
        gateway.remove()
    answered = [s for s in statuses if s is not None]
    assert len(answered) >= REQUESTS * 0.6, statuses
    assert set(answered) == {200}, statuses
    assert '"gateway_stopped"' in logs
    db = sqlite3.connect(volume_path(volume) / "gateway.db")
    try:
        rows = db.execute("SELECT request_id, status FROM ai_usage_logs").fetchall()
        assert len(rows) == len({r[0] for r in rows}) == len(answered), (statuses, rows)
        assert db.execute("SELECT COUNT(*) FROM reservations WHERE status = 'reserved'").fetchone()[0] == 0
        balance = db.execute("SELECT energy FROM users WHERE id = ?", (user["id"],)).fetchone()[0]
        assert balance == 1000 - 2 * len(answered)
    finally:
        db.close()


async def migrations(schema: str) -> int:
    conn = await asyncpg.connect(PG_URL)
    try:
        return await conn.fetchval(f'SELECT COUNT(*) FROM "{schema}".schema_migrations')
    finally:
        await conn.close()


def test_the_same_image_serves_with_postgresql_and_redis_and_two_workers(image, fake_upstream, tmp_path, volume):
    schema = "t_" + uuid.uuid4().hex[:12]
    prefix = f"gw:test:container:{uuid.uuid4().hex[:10]}"
    store_url = f"{PG_URL}?schema={schema}"
    config = write_config(tmp_path, fake_upstream, store_url,
                          tiers={"pro": {"models": ["*"], "limits": {"rpm": 10_000}}},
                          rate_limits={"redis_url": REDIS_URL, "key_prefix": prefix})
    gateway = Gateway(image, config, volume, env={"GATEWAY_WORKERS": "2"})
    counters = redis.Redis.from_url(REDIS_URL)
    try:
        # deploy/kubernetes/migration-job.yaml's command migrates the fresh schema and exits
        job = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "migration-job.yaml").read_text())
        gateway.cli(*job["spec"]["template"]["spec"]["containers"][0]["args"])
        assert asyncio.run(migrations(schema)) >= 1
        user = create_user(gateway)
        gateway.start()
        commands = gateway.exec("python", "-c", "import glob; print('\\n'.join(open(p, 'rb').read()"
                                ".replace(b'\\0', b' ').decode() for p in glob.glob('/proc/[0-9]*/cmdline')))").stdout
        processes = [line.strip() for line in commands.splitlines()]
        # tini, the supervisor and its two workers
        assert processes.count("python /app/proxy.py serve") == 3, processes
        assert processes.count("/usr/bin/tini -- python /app/proxy.py serve") == 1, processes
        for _ in range(6):
            assert chat(gateway, user["api_key"]) == "Hello from the fake upstream"
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait() == 0, gateway.logs()[-3000:]

        async def usage() -> list[Any]:
            conn = await asyncpg.connect(PG_URL)
            try:
                return await conn.fetch(f'SELECT status, energy_cost FROM "{schema}".ai_usage_logs')
            finally:
                await conn.close()

        assert [(r["status"], r["energy_cost"]) for r in asyncio.run(usage())] == [(200, 2)] * 6
        keys = counters.keys(f"{prefix}:u:{user['id']}:r:*")
        assert sum(int(counters.get(key)) for key in keys) == 6
    finally:
        gateway.remove()
        stale = counters.keys(f"{prefix}:*")
        if stale:
            counters.delete(*stale)
        counters.close()

        async def drop() -> None:
            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()

        asyncio.run(drop())
