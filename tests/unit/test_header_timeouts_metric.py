"""asgi_supervise_header_timeouts_total: workers report running totals in their beats;
the master's counter adds up live workers' latest and exited workers' last, so it never
goes down when a worker exits or a beat arrives late."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from asgi_supervise.observe.metrics import SupervisorMetrics, render


def total(metrics: SupervisorMetrics) -> float:
    body, _ = render(None, None, metrics)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "asgi_supervise_header_timeouts_total":
                return sample.value
    raise AssertionError("no asgi_supervise_header_timeouts_total")


def test_the_counter_adds_live_and_exited_workers_and_never_goes_down() -> None:
    metrics = SupervisorMetrics()
    assert total(metrics) == 0
    metrics.header_timeouts_seen(101, 3)
    metrics.header_timeouts_seen(102, 2)
    assert total(metrics) == 5
    metrics.header_timeouts_seen(101, 1)  # an older beat, read late
    assert total(metrics) == 5
    metrics.header_timeouts_final(101, 4)  # exited, one more closed since the last sample
    assert total(metrics) == 6
    metrics.header_timeouts_final(102, 0)  # exited before its last count arrived
    assert total(metrics) == 6
    metrics.header_timeouts_seen(103, 1)  # a replacement starts from zero
    assert total(metrics) == 7
