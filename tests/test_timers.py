"""The media worker's deadlines heap (media/timers.py), on virtual time.

Every deadline of a worker (each session's ICE/DTLS timer, each stream's feedback,
keyframe retry, NACKs, each viewer's probe padding) is an entry keyed by a
``(TimerKind, name)`` tuple; the driver arms one asyncio timer for the earliest.
"""

from __future__ import annotations

from whepfan.media.timers import TimerKind, Timers


def test_timers_wake_the_driver_only_for_a_new_earliest_deadline() -> None:
    wakes: list[None] = []
    timers = Timers(wake=lambda: wakes.append(None))
    timers.schedule((TimerKind.SESSION, "a"), 5.0)
    timers.schedule((TimerKind.SESSION, "b"), 7.0)  # later: the armed timer fires first
    timers.schedule((TimerKind.SESSION, "a"), 3.0)  # earlier: re-arm
    assert len(wakes) == 2
    assert timers.next_deadline() == 3.0
    timers.schedule((TimerKind.SESSION, "a"), None)
    assert timers.next_deadline() == 7.0  # the stale 3.0 and 5.0 entries are skipped
    assert list(timers.due(10.0)) == [(TimerKind.SESSION, "b")]
    assert timers.next_deadline() is None


def test_rescheduling_a_key_replaces_its_deadline_and_the_same_one_is_a_no_op() -> None:
    wakes: list[None] = []
    timers = Timers(wake=lambda: wakes.append(None))
    key = (TimerKind.NACK, "live")
    timers.schedule(key, 2.0)
    timers.schedule(key, 2.0)  # unchanged: nothing pushed, no wake
    assert len(wakes) == 1 and timers.deadline(key) == 2.0
    timers.schedule(key, 4.0)  # later: replaces it; the armed timer just fires early
    assert len(wakes) == 1 and timers.deadline(key) == 4.0
    assert list(timers.due(3.0)) == []  # the stale 2.0 entry is skipped
    assert list(timers.due(4.0)) == [key]
    assert timers.deadline(key) is None


def test_kinds_keep_one_name_apart_and_due_keys_come_earliest_first() -> None:
    timers = Timers()
    timers.schedule((TimerKind.PUBLISHER_FEEDBACK, "live"), 3.0)
    timers.schedule((TimerKind.MEDIA_TIMEOUT, "live"), 1.0)
    timers.schedule((TimerKind.KEYFRAME_RETRY, "live"), 2.0)
    timers.cancel((TimerKind.KEYFRAME_RETRY, "live"))
    assert timers.deadline((TimerKind.MEDIA_TIMEOUT, "live")) == 1.0
    assert list(timers.due(5.0)) == [
        (TimerKind.MEDIA_TIMEOUT, "live"),
        (TimerKind.PUBLISHER_FEEDBACK, "live"),
    ]


def test_a_handler_may_schedule_its_key_again_while_due_keys_are_taken() -> None:
    timers = Timers()
    key = (TimerKind.HEADROOM_PROBE, "viewer")
    timers.schedule(key, 1.0)
    fired = []
    for due in timers.due(1.5):
        fired.append(due)
        timers.schedule(due, 2.0)  # the handler's next deadline, after now
    assert fired == [key]
    assert timers.next_deadline() == 2.0
