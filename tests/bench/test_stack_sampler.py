"""The stack sampler the cold-start child uses to say where its warm-up's wall time went."""

from __future__ import annotations

import threading
import time

import pytest

from bench.stack_sampler import StackSampler


def _wait(seconds: float) -> None:
    # Sleeping rather than spinning: the sampler's thread gets the interpreter at once, however busy the
    # machine, and the sampled stack is the same.
    time.sleep(seconds)


def _outer() -> None:
    _wait(0.3)
    _inner()


def _inner() -> None:
    _wait(0.15)


def _names(result: dict) -> dict[str, float]:
    return {name.rsplit(":", 1)[1]: seconds for name, seconds in result["inclusive_s"]}


def test_each_function_gets_the_time_spent_in_it_and_in_what_it_called() -> None:
    sampler = StackSampler(threading.current_thread(), interval_s=0.005).start()
    _outer()
    sampler.stop()

    result = sampler.result()
    assert result["samples"] > 20
    assert result["seconds"] >= 0.45
    seconds = _names(result)
    # _outer was on the stack throughout, _inner for its last third, _wait in both.
    assert seconds["_outer"] == pytest.approx(result["seconds"], rel=0.1)
    assert seconds["_inner"] == pytest.approx(0.15, abs=0.05)
    assert seconds["_wait"] >= seconds["_inner"]
    assert seconds["_outer"] > 2 * seconds["_inner"]
    # Innermost, time.sleep being C code: _wait in every sample, so it holds all of the exclusive time.
    exclusive = _names({"inclusive_s": result["exclusive_s"]})
    assert exclusive["_wait"] == pytest.approx(result["seconds"], rel=0.1)
    assert "_outer" not in exclusive
    # Our own files are named from the repository's root.
    assert any(name.startswith("tests/bench/test_stack_sampler.py:") for name, _ in result["inclusive_s"])


def test_another_thread_is_sampled_not_the_one_that_asks() -> None:
    started = threading.Event()

    def work() -> None:
        started.set()
        _outer()

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    sampler = StackSampler(worker, interval_s=0.005).start()
    _wait(0.2)  # this thread's own stack must not show up
    worker.join()
    sampler.stop()

    seconds = _names(sampler.result())
    assert "_outer" in seconds
    assert "test_another_thread_is_sampled_not_the_one_that_asks" not in seconds


def test_a_thread_that_has_not_started_is_refused() -> None:
    with pytest.raises(ValueError, match="not started"):
        StackSampler(threading.Thread(target=_inner))
