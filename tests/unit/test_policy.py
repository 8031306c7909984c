"""The master's pure decisions: backoff, boot budget, recycling, the rolling planner."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from asgi_supervise.master import policy
from asgi_supervise.master.policy import Candidate, Overdue, Step
from asgi_supervise.sizing.budgets import Room, fits, reload_room


def test_first_crash_respawns_at_once_then_backs_off_exponentially():
    delays = [policy.respawn_delay(n, cap=30) for n in range(8)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0, max_value=600))
def test_backoff_never_exceeds_its_cap(crashes, cap):
    assert 0 <= policy.respawn_delay(crashes, cap) <= cap


def test_workers_that_die_young_back_off_exponentially():
    slot = policy.SlotHealth()
    assert slot.crashed(now=100, uptime=0.0, cap=30) == 0.0  # never ready
    assert slot.crashed(now=101, uptime=0.2, cap=30) == 0.5  # ready, died at once, no request
    assert slot.not_before == 101.5
    assert slot.crashed(now=102, uptime=0.0, cap=30) == 1.0


def test_a_worker_that_served_is_replaced_at_once_and_clears_the_crash_count():
    """Killed from outside every few seconds after serving: never a growing backoff."""
    slot = policy.SlotHealth()
    for now in range(100, 160, 3):  # SIGKILL every 3 s, each after 2.5 s of serving
        assert slot.crashed(now=now, uptime=2.5, cap=30) == 0.0
        assert slot.not_before == now
    # Served a request, then killed within the second: not a crash loop either.
    assert slot.crashed(now=200, uptime=0.1, cap=30, requests=1) == 0.0
    # A crash loop that ended with a worker that served starts counting afresh.
    slot.crashed(now=300, uptime=0.0, cap=30)
    slot.crashed(now=301, uptime=0.0, cap=30)
    assert slot.crashed(now=302, uptime=5.0, cap=30) == 0.0
    assert slot.crashed(now=303, uptime=0.0, cap=30) == 0.0  # first young death again
    assert slot.crashed(now=304, uptime=0.0, cap=30) == 0.5


def test_served_needs_ready_and_a_request_or_a_second_up():
    assert not policy.served(0.0, 0)
    assert not policy.served(0.0, 5)  # never ready: its request count means nothing
    assert not policy.served(0.5, 0)
    assert policy.served(0.5, 1)
    assert policy.served(policy.SERVED_AFTER, 0)


def test_the_last_serving_worker_is_replaced_at_once_even_in_a_crash_loop():
    slot = policy.SlotHealth()
    for crash in range(10):
        assert slot.crashed(now=crash, uptime=0.0, cap=30, alone=True) == 0.0
    assert slot.crashed(now=10, uptime=0.0, cap=30) == 30  # others serve: the backoff stands


@given(
    st.lists(st.tuples(st.floats(0, 100), st.integers(0, 5), st.booleans()), max_size=30),
    st.floats(min_value=0, max_value=600),
)
def test_never_zero_workers_while_the_app_is_known_to_boot(deaths, cap):
    """Whatever the history of a slot, the last worker standing respawns now."""
    slot = policy.SlotHealth()
    now = 0.0
    for uptime, requests, alone in deaths:
        now += 1
        delay = slot.crashed(now, uptime, cap, requests=requests, alone=alone)
        assert 0 <= delay <= cap
        if alone:
            assert delay == 0.0 and slot.not_before == now
        assert policy.slots_to_fill({1: slot.not_before}, now, live=0, app_boots=True) == [1]


def test_slots_to_fill_waits_out_the_backoff_unless_no_worker_is_left():
    empty = {1: 110.0, 2: 105.0, 3: 120.0}
    assert policy.slots_to_fill(empty, now=100, live=1, app_boots=True) == []
    assert policy.slots_to_fill(empty, now=106, live=1, app_boots=True) == [2]
    assert policy.slots_to_fill(empty, now=111, live=1, app_boots=True) == [1, 2]
    # Nothing serving or booting, and a worker of this code became ready before: the
    # soonest slot starts now, the others keep their backoff.
    assert policy.slots_to_fill(empty, now=100, live=0, app_boots=True) == [2]
    # The app never booted (a crash loop from the start): the backoff holds.
    assert policy.slots_to_fill(empty, now=100, live=0, app_boots=False) == []
    assert policy.slots_to_fill({}, now=100, live=0, app_boots=True) == []


def test_a_signal_from_outside_during_boot_is_no_boot_failure():
    killed, failed = policy.BootExit.KILLED, policy.BootExit.APP_FAILED
    assert policy.boot_exit("SIGKILL", None, killed_by_master=False) is killed  # OOM, operator
    assert policy.boot_exit("SIGTERM", None, killed_by_master=False) is killed
    assert policy.boot_exit("signal 40", None, killed_by_master=False) is killed
    # The app failing to start: what counts toward --boot-failure-limit.
    assert policy.boot_exit(None, "ImportError: x", killed_by_master=False) is failed
    assert policy.boot_exit(None, None, killed_by_master=False) is failed  # exited by itself
    assert policy.boot_exit("SIGSEGV", None, killed_by_master=False) is failed
    assert policy.boot_exit("SIGABRT", None, killed_by_master=False) is failed
    # The master's own ready-timeout kill is a SIGKILL too, and a failure of the app.
    assert policy.boot_exit("SIGKILL", "not ready within 60s", killed_by_master=True) is failed


def test_boot_budget_stops_after_the_limit_and_resets_on_success():
    budget = policy.BootBudget(limit=3)
    assert not budget.failed("ImportError: x")
    assert not budget.failed("ImportError: x")
    budget.succeeded()
    assert not budget.failed("ImportError: x")
    assert not budget.failed(None)
    assert budget.failed(None)
    assert budget.last_error == "ImportError: x"


def test_worker_limits_draw_jitter_within_bounds():
    rng = random.Random(7)
    for _ in range(200):
        requests, lifetime = policy.worker_limits(1000, 100, 3600.0, 60.0, rng)
        assert requests is not None and 1000 <= requests <= 1100
        assert lifetime is not None and 3600 <= lifetime <= 3660
    assert policy.worker_limits(None, 100, None, 60.0, rng) == (None, None)


def test_recycle_reason_order_memory_then_requests_then_lifetime():
    strikes = policy.MEMORY_STRIKES
    assert policy.recycle_reason(10, 5, 100, 50, strikes) == "memory"
    assert policy.recycle_reason(10, 5, 100, 50, strikes - 1) == "max-requests"
    assert policy.recycle_reason(4, 5, 100, 50, 0) == "lifetime"
    assert policy.recycle_reason(4, 5, 10, 50, 0) is None
    assert policy.recycle_reason(10**9, None, 10**9, None, 0) is None


def due(pid: int, slot: int, replacement: str | None = None) -> Candidate:
    return Candidate(pid, slot, "reload", replacement)


def test_planner_starts_replacements_up_to_the_surge_in_slot_order():
    plan = policy.plan_replacements([due(30, 3), due(10, 1), due(20, 2)], extra=0, surge=2, room=9)
    assert plan == [Step("spawn", 10, "reload"), Step("spawn", 20, "reload")]


def test_planner_drains_the_old_worker_only_once_its_replacement_is_ready():
    plan = policy.plan_replacements(
        [due(10, 1, "ready"), due(20, 2, "booting"), due(30, 3)],
        extra=2,
        surge=2,
        room=9,
    )
    assert plan == [Step("stop", 10, "reload")]  # slot 3 waits: two replacements are up


def test_planner_counts_old_workers_still_draining_against_the_surge():
    """Slot 1's old worker drains (its replacement is serving): one worker beyond target."""
    waiting = policy.plan_replacements([due(20, 2)], extra=1, surge=1, room=9)
    assert waiting == []
    exited = policy.plan_replacements([due(20, 2)], extra=0, surge=1, room=9)
    assert exited == [Step("spawn", 20, "reload")]


def test_planner_waits_while_a_slot_drained_first_is_refilling():
    """Slot 1 drained first and is booting again: draining slot 2 now would leave none."""
    plan = policy.plan_replacements([due(20, 2)], extra=1, surge=1, room=0)
    assert plan == []


def test_in_transition_counts_what_keeps_the_instance_from_one_serving_worker_per_slot():
    slots = [1, 2]
    assert policy.in_transition([(1, True), (2, True)], slots) == 0  # settled
    assert policy.in_transition([(1, True), (1, False), (2, True)], slots) == 1  # booting
    assert policy.in_transition([(1, False), (1, True), (2, True)], slots) == 1  # draining
    assert policy.in_transition([(1, False), (2, True)], slots) == 1  # drains first, refills
    assert policy.in_transition([(2, True)], slots) == 1  # empty: about to be refilled
    assert policy.in_transition([(1, True), (2, True), (3, False)], slots) == 1  # scaled down
    both = [(1, False), (1, True), (2, True), (2, False)]
    assert policy.in_transition(both, slots) == 2


def test_planner_drains_first_when_the_budgets_hold_no_more_workers():
    plan = policy.plan_replacements([due(10, 1)], extra=0, surge=1, room=0)
    assert plan == [Step("drain-first", 10, "reload")]


def test_planner_starts_replacements_beside_old_workers_only_up_to_the_room():
    """Surge 2 but room for one more: the second slot drains first."""
    plan = policy.plan_replacements([due(10, 1), due(20, 2)], extra=0, surge=2, room=1)
    assert plan == [Step("spawn", 10, "reload"), Step("drain-first", 20, "reload")]


@given(
    st.lists(
        st.tuples(st.integers(1, 50), st.sampled_from([None, "booting", "ready"])),
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 5),
    st.integers(1, 5),
    st.integers(0, 5),
)
def test_planner_never_exceeds_the_surge_nor_the_room(workers, extra, surge, room):
    candidates = [due(slot * 10, slot, state) for slot, state in workers]
    plan = policy.plan_replacements(candidates, extra, surge, room)
    started = [s for s in plan if s.action in ("spawn", "drain-first")]
    assert extra + len(started) <= max(surge, extra)
    assert len([s for s in plan if s.action == "spawn"]) <= room
    stopped = {s.pid for s in plan if s.action == "stop"}
    assert stopped == {c.pid for c in candidates if c.replacement == "ready"}


def test_fits():
    assert fits(used=600, each=400, budget=1000) == 1
    assert fits(used=700, each=400, budget=1000) == 0
    assert fits(used=1200, each=400, budget=1000) == 0  # over already: none, not < 0
    assert fits(used=4 * 10, each=10, budget=60) == 2  # connections: 4 pools of 10


def test_reload_room_is_the_surge_unless_a_budget_holds_fewer():
    memory, db = Room("memory", 3, "m"), Room("db", 1, "d")
    assert reload_room(2, []) == (2, None)
    assert reload_room(2, [memory]) == (2, None)  # holds 3: the surge decides
    assert reload_room(2, [memory, db]) == (1, db)
    assert reload_room(1, [Room("db", 0, "d"), memory]) == (0, Room("db", 0, "d"))


# --- deadlines: the state machine of one worker ----------------------------------------

READY_TIMEOUT, WORKER_TIMEOUT = 30.0, 10.0


def overdue(state, now, *, started=0.0, last_beat=0.0, kill_at=None, killed=False):
    return policy.overdue(
        state, now, started, last_beat, kill_at, killed, READY_TIMEOUT, WORKER_TIMEOUT
    )


def test_a_booting_worker_has_until_the_ready_timeout():
    assert overdue("booting", 30.0) is None
    assert overdue("booting", 30.1) is Overdue.BOOT


def test_a_ready_worker_must_beat_within_the_worker_timeout():
    assert overdue("ready", 100.0, last_beat=90.0) is None
    assert overdue("ready", 100.1, last_beat=90.0) is Overdue.SILENT
    assert overdue("ready", 100.1, started=0.0, last_beat=95.0) is None  # boot age is not it


def test_a_draining_worker_is_killed_at_its_deadline_and_only_then():
    assert overdue("draining", 9.9, kill_at=10.0) is None
    assert overdue("draining", 10.0, kill_at=10.0) is Overdue.DRAIN
    assert overdue("draining", 500.0, last_beat=0.0, kill_at=600.0) is None  # beats don't matter


def test_a_worker_already_killed_waits_for_its_escalation():
    """SIGABRT sent (a blocked loop): no second verdict until its SIGKILL deadline."""
    assert overdue("ready", 200.0, last_beat=0.0, kill_at=201.0, killed=True) is None
    assert overdue("ready", 201.0, last_beat=0.0, kill_at=201.0, killed=True) is Overdue.KILL
    assert overdue("draining", 201.0, kill_at=201.0, killed=True) is Overdue.KILL
    assert overdue("booting", 99.0, killed=True) is None  # ready timeout already acted on


def test_fork_server_needed_for_a_generation():
    need, N = policy.fork_server_need, policy.ForkServerNeed
    # (generation, newest, current up, one booting, preload, now, not_before)
    assert need(0, None, False, False, False, 0.0, 0.0) is N.START  # the first
    assert need(0, 0, False, True, False, 0.0, 0.0) is N.NONE  # it boots already
    assert need(1, 0, True, False, False, 0.0, 0.0) is N.KEEP  # a reload, no app code in it
    assert need(1, 0, True, False, True, 0.0, 0.0) is N.START  # --preload: the old app in it
    assert need(2, 1, True, True, True, 0.0, 0.0) is N.START  # superseded while booting
    assert need(0, None, False, False, False, 1.0, 1.5) is N.WAIT  # died young: backoff
    assert need(0, None, False, False, False, 1.5, 1.5) is N.START


def test_a_failed_preload_aborts_a_reload_waits_for_a_save_or_exits():
    failure, F = policy.preload_failure, policy.PreloadFailure
    assert failure(for_reload=True, dev_reload=False) is F.ABORT_RELOAD
    assert failure(for_reload=True, dev_reload=True) is F.ABORT_RELOAD
    assert failure(for_reload=False, dev_reload=True) is F.WAIT_FOR_SAVE
    assert failure(for_reload=False, dev_reload=False) is F.EXIT
