"""Python 3.9 stand-ins for the few ≥ 3.10 built-ins the library uses (Slicer 5.8, the minimum, ships Python 3.9).

``zip_strict(a, b)`` is ``zip(a, b, strict=True)``: lazy, and a ``ValueError`` with the built-in's message as soon as
one iterable ends before the others — the length check is a real guard (a level paired with the wrong mask must
fail, not be silently dropped). ``pairwise`` is ``itertools.pairwise``. On Python ≥ 3.10 both are the built-ins
themselves; the pure-Python versions (``_zip_strict``, ``_pairwise``) are what 3.9 runs, and the tests compare them
with the built-ins.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["pairwise", "zip_strict"]

_MISSING = object()


def _arguments(n: int) -> str:
    """``argument 1`` / ``arguments 1-n``, as the built-in ``zip`` words it."""
    return "argument 1" if n == 1 else f"arguments 1-{n}"


def _zip_strict(*iterables: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    """``zip(*iterables, strict=True)`` in pure Python (same tuples, same laziness, same ``ValueError``)."""
    if not iterables:
        return
    iterators = [iter(it) for it in iterables]
    while True:
        items = []
        for i, it in enumerate(iterators):
            item = next(it, _MISSING)
            if item is _MISSING:
                if i:
                    raise ValueError(f"zip() argument {i + 1} is shorter than {_arguments(i)}")
                for j, other in enumerate(iterators[1:], start=2):  # the first ended: every other must end too
                    if next(other, _MISSING) is not _MISSING:
                        raise ValueError(f"zip() argument {j} is longer than {_arguments(j - 1)}")
                return
            items.append(item)
        yield tuple(items)


def _pairwise(iterable: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """``itertools.pairwise``: (s0, s1), (s1, s2), … in pure Python."""
    it = iter(iterable)
    previous = next(it, _MISSING)
    if previous is _MISSING:
        return
    for item in it:
        yield previous, item
        previous = item


if sys.version_info >= (3, 10):
    zip_strict = functools.partial(zip, strict=True)  # novm (only reached on Python ≥ 3.10)
    pairwise = itertools.pairwise  # novm
else:
    zip_strict = _zip_strict
    pairwise = _pairwise
