"""This release's command line with one more backfill registered, as a migration's own
backfill is (gateway/store/backfill.py): `python tests/upgrade_launcher.py serve ...`.

The backfill fills TEST_FAMILY, a small rollup of the usage rows by model, from the
history that migration 20 found (its tables are created by the test, as a migration
would). tests/test_upgrades.py runs it on a store of the previous release.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.store import backfill, rollup  # noqa: E402

TEST_FAMILY = rollup.Family(("model",), ("requests", "tokens_total", "cost_usd"), (),
                            {"hour": "test_rollup_models", "day": "test_rollup_models_daily"})
TEST_BACKFILL = backfill.register(backfill.Backfill(
    "test_rollup_models", 20, backfill.rollup_chunk((TEST_FAMILY,)), ("test_rollup_models_daily",)))


def table_ddl(dialect: str) -> list[str]:
    return [rollup.table_ddl(dialect, TEST_FAMILY, grain) for grain in TEST_FAMILY.tables]


if __name__ == "__main__":
    import proxy

    sys.exit(proxy.main())
