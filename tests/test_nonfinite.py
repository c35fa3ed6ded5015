"""The count of non-finite steps that stops a stage: in a row, reset by a finite step."""

from __future__ import annotations

import pytest

from omnilong.train.nonfinite import NonFiniteStepsError, NonFiniteStreak


def test_only_skips_in_a_row_stop_the_stage():
    streak = NonFiniteStreak(limit=2)
    for step, skipped in enumerate((True, False, True)):
        streak.count(skipped)
        streak.stop_if_too_many(step, 10)  # a finite step between the skips: never two in a row
    streak.count(True)
    with pytest.raises(NonFiniteStepsError, match=r"^step 4/10: 2 optimizer steps in a row .*max_nonfinite_steps: 2"):
        streak.stop_if_too_many(3, 10)
    assert streak.total == 3
