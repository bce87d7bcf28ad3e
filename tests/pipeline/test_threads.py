"""Work beside the main thread within the caller's core budget."""

from __future__ import annotations

import threading

import pytest
import scipy.fft

from apqa.pipeline.threads import beside, core_budget, on_both


def _thread_name(_: object = None) -> str:
    return threading.current_thread().name


def test_beside_uses_a_second_thread_only_with_two_cores():
    with beside(2, _thread_name) as name:
        pass
    assert name.result() != threading.current_thread().name
    with beside(1, _thread_name) as name:
        pass
    assert name.result() == threading.current_thread().name


def test_on_both_keeps_the_order_and_raises_what_either_side_raises():
    assert on_both(lambda v: v * 2, (3,), (5,), budget=2) == (6, 10)
    assert on_both(lambda v: v * 2, (3,), (5,), budget=1) == (6, 10)

    def fail_on_template(name: str) -> str:
        if name == "template":
            raise ValueError("template: broken")
        return name

    with pytest.raises(ValueError, match="template: broken"):
        on_both(fail_on_template, ("science",), ("template",), budget=2)


def test_core_budget_follows_scipy_fft_workers():
    assert core_budget(3) == 3
    with scipy.fft.set_workers(1):
        assert core_budget() == 1
    with scipy.fft.set_workers(-1):
        assert core_budget() >= 1


def test_a_deferred_result_is_computed_once_as_a_futures_is():
    calls = []
    with beside(1, lambda: calls.append(1) or len(calls)) as deferred:
        assert calls == []  # nothing runs until the result is asked for
    assert (deferred.result(), deferred.result()) == (1, 1)
    assert calls == [1]
