"""SyncSchedule: which fragment starts and merges at which inner step, with overlap."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diloco.schedule import SyncEvent, SyncSchedule


def test_streaming_schedule_by_hand() -> None:
    schedule = SyncSchedule(sync_every=8, fragments=4, overlap_steps=2)
    starts = {t: schedule.starting(t) for t in range(1, 18) if schedule.starting(t)}
    merges = {t: schedule.merging(t) for t in range(1, 20) if schedule.merging(t)}
    assert starts == {2: [1], 4: [2], 6: [3], 8: [0], 10: [1], 12: [2], 14: [3], 16: [0]}
    assert merges == {4: [1], 6: [2], 8: [3], 10: [0], 12: [1], 14: [2], 16: [3], 18: [0]}
    assert schedule.in_flight_after(5) == [2]
    assert schedule.in_flight_after(4) == [2]  # 1 merged at 4, 2 started at 4
    assert schedule.in_flight_after(3) == [1]
    assert schedule.events(8)[0] == SyncEvent(fragment=1, start_step=2, merge_step=4)


def test_plain_diloco_syncs_every_h_steps_without_overlap() -> None:
    schedule = SyncSchedule(sync_every=50)
    steps = [t for t in range(1, 201) if schedule.starting(t)]
    assert steps == [50, 100, 150, 200]
    assert all(schedule.merging(t) == schedule.starting(t) for t in range(1, 201))
    assert schedule.in_flight_after(50) == []


def test_fragment_offsets_are_p_h_over_p() -> None:
    schedule = SyncSchedule(sync_every=100, fragments=4, overlap_steps=2)
    assert [schedule.offset(p) for p in range(4)] == [0, 25, 50, 75]
    assert schedule.starting(125) == [1] and schedule.merging(127) == [1]


@pytest.mark.parametrize("h, p, tau", [(0, 1, 0), (4, 5, 0), (4, 2, 4), (4, 2, -1)])
def test_invalid_schedules_are_refused(h: int, p: int, tau: int) -> None:
    with pytest.raises(ValueError):
        SyncSchedule(sync_every=h, fragments=p, overlap_steps=tau)


@st.composite
def schedules(draw: st.DrawFn) -> SyncSchedule:
    h = draw(st.integers(1, 40))
    return SyncSchedule(h, draw(st.integers(1, h)), draw(st.integers(0, h - 1)))


@given(schedules(), st.integers(1, 4))
def test_every_fragment_syncs_once_per_window_and_merges_tau_later(
    schedule: SyncSchedule, rounds: int
) -> None:
    h, horizon = schedule.sync_every, schedule.sync_every * rounds
    events = schedule.events(horizon)
    for p in range(schedule.fragments):
        starts = [e.start_step for e in events if e.fragment == p]
        assert len(starts) == rounds  # once per window of H steps
        assert all(b - a == h for a, b in zip(starts, starts[1:], strict=False))
    assert all(e.merge_step - e.start_step == schedule.overlap_steps for e in events)
    assert all(len(schedule.starting(t)) <= 1 for t in range(1, horizon + 1))


@given(schedules(), st.integers(1, 120))
def test_in_flight_matches_a_simulation(schedule: SyncSchedule, last: int) -> None:
    in_flight: set[int] = set()
    for t in range(1, last + 1):
        for p in schedule.starting(t):
            assert p not in in_flight  # merged before it starts again
            in_flight.add(p)
        for p in schedule.merging(t):
            in_flight.remove(p)
        assert sorted(schedule.in_flight_after(t)) == sorted(in_flight)
