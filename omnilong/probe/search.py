"""The longest length that fits: doubling from a length that must fit, then bisection.

Lengths are multiples of `step` (2 x sp_size: zigzag sharding cuts a row into that many equal
chunks). Memory grows with the length, so once a length does not fit no longer one is tried.
"""

from __future__ import annotations

from collections.abc import Callable


def longest_fitting(fits: Callable[[int], bool], lowest: int, highest: int, step: int) -> int | None:
    """The longest multiple of `step` in [lowest, highest] that `fits`, or None when `lowest` does not.

    Tries `lowest`, then doubles until a length does not fit or `highest` is reached (capped
    there), then bisects between the last length that fitted and the first that did not until
    they are `step` apart: the result L fitted and, unless L is `highest`, L + step was tried
    and did not.
    """
    if step < 1 or lowest % step or highest % step or not step <= lowest <= highest:
        raise ValueError(f"expected step <= lowest <= highest, multiples of step; given {lowest}, {highest}, {step}")
    if not fits(lowest):
        return None
    fitting, too_long = lowest, None
    while too_long is None and fitting < highest:
        length = min(2 * fitting, highest)
        if fits(length):
            fitting = length
        else:
            too_long = length
    while too_long is not None and too_long - fitting > step:
        middle = (fitting + too_long) // 2 // step * step  # strictly between: they are 2 steps apart at least
        if fits(middle):
            fitting = middle
        else:
            too_long = middle
    return fitting
