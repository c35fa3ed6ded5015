"""The count of non-finite steps that stops a stage: in a row, reset by a finite step."""

from __future__ import annotations

import json

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


def test_a_resumed_stage_keeps_the_streak_and_the_count():
    streak = NonFiniteStreak(limit=2)
    for skipped in (True, False, True):
        streak.count(skipped)
    resumed = NonFiniteStreak(limit=2, saved=json.loads(json.dumps(streak.state())))  # as the manifest keeps it
    resumed.count(True)
    assert resumed.total == 3
    with pytest.raises(NonFiniteStepsError, match="2 optimizer steps in a row"):
        resumed.stop_if_too_many(3, 10)
