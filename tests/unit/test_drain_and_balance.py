"""The pure parts of draining and balancing: the worst-case drain time and who pauses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_supervise import drain
from asgi_supervise.config.settings import Settings
from asgi_supervise.master import balance


def test_worst_case_is_the_sum_of_every_part():
    times = drain.DrainTimes(drain_delay=5, stream_grace=1, graceful_timeout=10, shutdown_timeout=5)
    assert times.worker_bound == 10 + drain.CANCEL_WAIT + 5
    assert times.abort_after == times.worker_bound + drain.EXIT_MARGIN
    assert times.worst_case == 5 + times.abort_after + drain.KILL_GRACE == 25
    assert times.streams_closed == 6
    assert times.describe().startswith("25s at worst from SIGTERM")


def test_streams_never_wait_past_the_graceful_timeout():
    times = drain.DrainTimes(drain_delay=0, stream_grace=60, graceful_timeout=2, shutdown_timeout=1)
    assert times.streams_closed == 2


def test_of_reads_the_settings_model_and_a_workers_plain_copy():
    settings = Settings.model_validate({"drain_delay": 3, "graceful_timeout": 7})
    plain = SimpleNamespace(**settings.model_dump(mode="json"))
    assert drain.of(settings) == drain.of(plain)
    assert drain.of(settings).worst_case == 3 + 7 + 1 + 5 + 2 + 2


def test_defaults_fit_kubernetes_default_grace_period_with_margin():
    assert drain.of(Settings.model_validate({})).worst_case <= 25


def test_one_worker_never_pauses():
    assert balance.paused({"a": 100}, set()) == set()


def test_the_busiest_pauses_when_clearly_above_the_average():
    assert balance.paused({"a": 31, "b": 9}, set()) == {"a"}
    assert balance.paused({"a": 21, "b": 19}, set()) == set()  # within the slack


def test_a_paused_worker_resumes_at_the_average_not_before():
    assert balance.paused({"a": 22, "b": 18}, {"a"}) == {"a"}  # above the average: stays
    assert balance.paused({"a": 20, "b": 20}, {"a"}) == set()


def test_low_counts_do_not_churn():
    assert balance.paused({"a": 3, "b": 0}, set()) == set()
    assert balance.paused({"a": 0, "b": 0, "c": 0}, {"a"}) == set()


@given(st.dictionaries(st.integers(0, 7), st.integers(0, 1000), min_size=1, max_size=8),
       st.sets(st.integers(0, 7)))  # fmt: skip
def test_never_every_worker_paused_and_the_least_loaded_accepts(counts, now_paused):
    result = balance.paused(counts, now_paused)
    assert result <= set(counts)
    if len(counts) >= 2:
        assert len(result) < len(counts)
        least = min(counts.values())
        assert any(counts[key] == least and key not in result for key in counts)


@pytest.mark.parametrize("average", [0, 5, 25, 100, 1000])
def test_the_threshold_is_above_the_average(average):
    assert balance.pause_threshold(average) >= average + balance.MIN_SLACK


def test_a_worker_reads_the_masters_messages_without_blocking():
    import socket

    from asgi_supervise.protocol import Control, encode

    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    control = Control(worker)
    try:
        assert control.poll() == ([], False)
        master.send(encode({"t": "pause"}))
        master.send(b"not json")
        master.send(encode({"t": "resume"}))
        assert control.poll() == ([{"t": "pause"}, {"t": "resume"}], False)
        master.close()
        assert control.poll() == ([], True)
    finally:
        worker.close()
