"""Structured logs (gateway/logs.py): the per-request events' cheaper path writes the same
line as structlog's own call, in a process configured as `proxy.py serve` configures it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import structlog
from decimal import Decimal
from gateway import logs
from gateway.logs import PerRequestLog

logs.configure("info")
fields = {"request_id": "req_1", "status": 200, "latency_ms": 12.34, "stream": False, "model": None,
          "cost_usd": Decimal("0.000120000"), "user_id": "usr_1"}
for name in ("gateway.request", "gateway.analytics", "gateway.other"):
    for method in ("info", "debug", "warning"):
        structlog.contextvars.bind_contextvars(trace_id="t1")
        getattr(structlog.get_logger(name), method)("request_completed", **fields)
        PerRequestLog(name).emit(method, "request_completed", dict(fields))
        structlog.contextvars.clear_contextvars()
        getattr(structlog.get_logger(name), method)("request_failed", **fields)
        PerRequestLog(name).emit(method, "request_failed", dict(fields))
"""


def test_a_per_request_event_writes_the_line_structlog_writes():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, timeout=60, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 * 3 * 3 * 2
    for theirs, ours in zip(lines[::2], lines[1::2]):
        for line in (theirs, ours):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line.pop("timestamp"))
        assert list(ours.items()) == list(theirs.items())  # the same keys, values and order
    assert lines[0]["trace_id"] == "t1" and lines[0]["cost_usd"] == 0.00012 and lines[0]["level"] == "info"
