"""The parts of stopping on SIGTERM that the training tests (test_elastic, test_autoscaling, test_submit) do not reach:
the handler's hand-over to the previous one, and a StopRequest actor that is gone for good."""

import os
import signal
import time

from athanor.cluster.stop import StopWatch, start_stop_request, stop_on_signals


def _wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_first_sigterm_requests_a_stop_and_hands_the_next_to_the_previous_handler(ray_local):
    stop_request = start_stop_request()
    watch = StopWatch(stop_request)
    seen = []

    def before(signum, _frame):
        seen.append(signum)

    pytest_handler = signal.signal(signal.SIGTERM, before)
    try:
        with stop_on_signals(stop_request) as received:
            assert not watch.requested() and signal.getsignal(signal.SIGTERM) is not before
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_until(lambda: received == ["SIGTERM"])
            _wait_until(watch.requested)
            os.kill(os.getpid(), signal.SIGTERM)  # the second goes where SIGTERM went before
            _wait_until(lambda: seen == [signal.SIGTERM])
            assert received == ["SIGTERM"]
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, pytest_handler)


def test_a_stop_request_actor_gone_for_good_is_not_a_request_to_stop(ray_local):
    stop_request = start_stop_request()
    watch = StopWatch(stop_request)
    assert not watch.requested()
    ray_local.kill(stop_request, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the pending call fails once Ray knows the actor is dead
        assert not watch.requested()
        if watch._pending is None:
            break
        time.sleep(0.05)
    assert watch._pending is None and not watch.requested()
