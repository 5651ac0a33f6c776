"""The probes' answers from the balancer's lifecycle, on a made-up clock."""

from __future__ import annotations

from corral.control.probes import LIVENESS_LIMIT, Probes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_only_between_start_and_shutdown() -> None:
    clock = Clock()
    probes = Probes(clock)
    assert probes.not_ready() == "starting: the listeners are not up yet"
    assert probes.not_alive() is None  # a process still starting is not dead
    probes.beat()
    probes.started = True
    assert probes.not_ready() is None
    probes.stopping = True
    assert probes.not_ready() == "shutting down: draining requests in flight"
    assert probes.not_alive() is None


def test_a_silent_control_loop_fails_liveness_and_readiness() -> None:
    clock = Clock()
    probes = Probes(clock)
    probes.beat()
    probes.started = True
    clock.now += LIVENESS_LIMIT
    assert probes.not_alive() is None
    clock.now += 1
    reason = probes.not_alive()
    assert reason == "the control loop has not run for 11 s (limit 10 s)"
    assert probes.not_ready() == reason
    probes.beat()
    assert probes.not_alive() is None and probes.not_ready() is None
