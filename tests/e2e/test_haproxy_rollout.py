"""A rolling deploy behind a real load balancer, with no request lost.

HAProxy health-checks each asgi-supervise master's /readyz like a readiness probe and
balances ~200 req/s of keep-alive traffic over two instances; each is replaced in turn
like a Deployment replaces a pod (SIGTERM the old one, start the new version). The
machinery is bench/haproxy_rollout.py, which also runs plain `uvicorn --workers 2` the
same way for comparison.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import haproxy_rollout

# CI installs haproxy (.ci/run): there a missing one fails the test rather than skipping it.
pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None and not os.environ.get("CI"),
    reason="haproxy is not installed (.ci/run installs it)",
)


@pytest.mark.timeout(180)
def test_rollout_behind_haproxy_loses_no_request(tmp_path):
    result = haproxy_rollout.rollout("asgi-supervise", tmp_path, rate=200, clients=8)
    assert result.failed == 0, (result.failures, result.examples)
    assert result.exit_codes == [0, 0]  # both old masters drained cleanly
    # Traffic really flowed through the rollout, and both versions served during it.
    assert result.total >= 1000, result.total
    assert set(result.versions_during) == {"1", "2"}, result.versions_during
    # Once rolled, every answer comes from the new version.
    assert result.versions_after == {"2": result.versions_after.get("2", 0)}
    assert result.versions_after["2"] >= 400
