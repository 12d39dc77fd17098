"""Where two strings first and last differ (common prefix and suffix lengths), fast on long texts.

Separate from the span rules in curate.chat.spans and curate.chat.slow_path, which both use them: they
compare renderings of a chat as plain strings and know nothing of templates or turns.
"""

from __future__ import annotations


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix (bisection on slices: C-speed compares on long texts)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_suffix(a: str, b: str, floor: int = 0) -> int:
    """Length of the common suffix of a[floor:] and b[floor:]."""
    return _common_prefix(a[floor:][::-1], b[floor:][::-1])


def _insertions(text: str, marked: str, mark: str, n: int) -> list[int] | None:
    """Where `marked` is `text` with `mark` inserted n times: the n places in `text`, in order; None when
    it is not (the template changed something else, or escaped the mark)."""
    places, a, b = [], 0, 0
    for _ in range(n):
        p = _common_prefix(text[a:], marked[b:])
        a, b = a + p, b + p
        if not marked.startswith(mark, b):
            return None
        places.append(a)
        b += len(mark)
    return places if text[a:] == marked[b:] else None


def _common_end(a: str, b: str) -> str:
    """The common suffix of a and b that does not reach into their common prefix."""
    n = _common_suffix(a, b, _common_prefix(a, b))
    return a[len(a) - n:] if n else ""
