"""The workers' adaptation of prometheus_client's MmapedDict: every mapped page has its
block, and a series without room is kept in memory and counted, never a SIGBUS.

Real files. "No room" here is a real failure of the kernel (RLIMIT_FSIZE: EFBIG, in a
child process); the full tmpfs itself: e2e/test_metrics_dir.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import mmap_dict
from prometheus_client.mmap_dict import MmapedDict

from asgi_supervise.protocol import APP_SAMPLES_DROPPED
from asgi_supervise.worker import promfiles

Reserving = promfiles.reserving_class(mmap_dict)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def stored(path: Path) -> dict[str, float]:
    return {k: v for k, v, _, _ in MmapedDict.read_all_values_from_file(str(path))}


def test_files_are_prometheus_clients_with_every_block_allocated(tmp_path: Path) -> None:
    path = tmp_path / "counter_1.db"
    d = Reserving(str(path))
    assert allocated(path) >= os.path.getsize(path) == 1 << 16  # stock: 0 bytes, sparse
    keys = [json.dumps(["m", "m_total", {"route": f"/r/{i}"}, "help"]) for i in range(2000)]
    for i, key in enumerate(keys):
        d.write_value(key, float(i), 0.0)
    assert os.path.getsize(path) > 1 << 16  # grown, by doubling
    assert allocated(path) >= os.path.getsize(path)
    assert d.read_value(keys[7]) == (7.0, 0.0)
    d.close()
    assert stored(path) == {key: float(i) for i, key in enumerate(keys)}

    again = Reserving(str(path))  # a reused pid writes on in the same file
    again.write_value(keys[0], 41.0, 0.0)
    again.write_value("new", 1.0, 0.0)
    again.close()
    assert stored(path)[keys[0]] == 41.0 and stored(path)["new"] == 1.0


def test_write_through_allocates_and_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as fh:
        fh.write(b"head")
        fh.truncate(200_000)
    assert allocated(path) < 200_000
    fd = os.open(path, os.O_RDWR)
    try:
        promfiles.write_through(fd, 300_000)
    finally:
        os.close(fd)
    assert os.path.getsize(path) == 300_000
    assert allocated(path) >= 300_000
    data = path.read_bytes()
    assert data[:4] == b"head" and data[4:] == bytes(300_000 - 4)


def test_deliver_sends_only_what_the_master_has_not_heard(monkeypatch) -> None:
    monkeypatch.setattr(promfiles.Drops, "dropped", 0)
    monkeypatch.setattr(promfiles.Drops, "delivered", 0)
    sent: list[dict[str, Any]] = []
    promfiles.deliver(lambda m: sent.append(m) or True)
    assert sent == []  # nothing dropped, nothing said
    promfiles.Drops.dropped = 5
    promfiles.deliver(lambda m: False)  # the channel is full: try again next time
    promfiles.deliver(lambda m: sent.append(m) or True)
    promfiles.Drops.dropped = 7
    promfiles.deliver(lambda m: sent.append(m) or True)
    assert sent == [
        {"t": "metrics", APP_SAMPLES_DROPPED: 5},
        {"t": "metrics", APP_SAMPLES_DROPPED: 2},
    ]


def test_install_does_nothing_without_a_multiprocess_directory(monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    before = list(sys.meta_path)
    promfiles.install()
    assert sys.meta_path == before
    assert mmap_dict.MmapedDict is MmapedDict


CHILD = """
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # beyond the limit: EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (__LIMIT__, __LIMIT__))
from asgi_supervise.worker import promfiles
promfiles.install()
assert "prometheus_client" not in sys.modules  # installed without importing it
from prometheus_client import Counter, values
from prometheus_client.mmap_dict import MmapedDict
assert values.MmapedDict is MmapedDict and MmapedDict.reserves_blocks
hits = Counter("app_hits", "Hits.", ["route"])
for i in range(__ROUTES__):
    hits.labels(f"/r/{i}").inc(2)
print(json.dumps({
    "dropped": promfiles.Drops.dropped,
    "last": hits.labels(f"/r/{__ROUTES__ - 1}")._value.get(),
    "first": hits.labels("/r/0")._value.get(),
}))
"""


@pytest.mark.parametrize("limit", [0, 100_000])
def test_no_room_keeps_series_in_memory_and_counts_their_writes(tmp_path: Path, limit: int):
    """Stock prometheus_client raises OSError into the app here (and on a full tmpfs
    dies of SIGBUS instead); adapted, the app never notices."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    code = textwrap.dedent(CHILD).replace("__LIMIT__", str(limit)).replace("__ROUTES__", "3000")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["first"] == got["last"] == 2  # every series works, with or without room
    assert got["dropped"] > 0
    files = list(tmp_path.glob("*.db"))
    if limit == 0:  # no room for even the first file: none is left behind, empty
        assert files == []
    else:  # the series that had room are in the file, readable
        (path,) = files
        values = stored(path)
        assert 0 < len(values) < 3000 and set(values.values()) == {2.0}
        assert got["dropped"] == 3000 - len(values)
