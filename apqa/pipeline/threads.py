"""Image work in a second thread, when the caller's core budget allows it.

The budget is scipy.fft's worker setting unless given: ``apqa diff`` sets it to every core
(``apqa.cli.app.all_cores``), while a Dask worker keeps scipy's default of one, so that two
workers do not fight over the same cores. numpy, scipy.ndimage and scipy.fft release the GIL
for image-sized arrays, so two such calls run side by side.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Generic, TypeVar

from scipy import fft as sfft

T = TypeVar("T")


def core_budget(workers: int | None = None) -> int:
    """Cores the caller may use: ``workers`` when given, else scipy.fft's setting (-1 and
    other negative values count back from every core, as in scipy)."""
    budget = workers if workers is not None else sfft.get_workers()
    if budget < 0:
        budget = max(1, (os.cpu_count() or 1) + 1 + budget)
    return budget


class _Deferred(Generic[T]):
    """``function(*args)`` computed when its result is first asked for (the one-core case),
    once, as a Future's."""

    def __init__(self, function: Callable[..., T], args: tuple) -> None:
        self._call: Callable[[], T] | None = lambda: function(*args)
        self._value: T | None = None

    def result(self) -> T:
        if self._call is not None:
            self._value, self._call = self._call(), None
        return self._value  # type: ignore[return-value]


@contextmanager
def beside(budget: int, function: Callable[..., T], *args: object
           ) -> Iterator[Future[T] | _Deferred[T]]:
    """``function(*args)`` in a second thread while the ``with`` block runs; ``.result()``
    of what it yields waits for it. With a budget of one core it is computed when its result
    is asked for instead.

    Examples
    --------
    >>> with beside(2, sum, [1, 2, 3]) as total:
    ...     other = max([1, 2, 3])
    >>> total.result(), other
    (6, 3)
    """
    if budget < 2:
        yield _Deferred(function, args)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(function, *args)


def on_both(function: Callable[..., T], science_args: tuple, template_args: tuple,
            budget: int) -> tuple[T, T]:
    """``function`` on the science's and on the template's arguments: side by side when the
    budget allows, else one after the other."""
    with beside(budget, function, *template_args) as template_result:
        science_result = function(*science_args)
        return science_result, template_result.result()
