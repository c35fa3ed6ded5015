"""The GPU suite's CPU mode (`--quick --device cpu`, run once per session by conftest's
`gpu_suite_quick`): every part runs at toy sizes, so the suite cannot rot between GPU loans."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_every_part_runs_in_cpu_mode(gpu_suite_quick):
    from benchmarks.gpu_suite import PARTS

    records = gpu_suite_quick

    assert set(records) == {*PARTS, "summary"}
    assert all(records["summary"]["ok"].values())
    ring = records["ring_attention"]
    assert {(c["dtype"], c["sp_size"]) for c in ring["checks"]} == {
        (dtype, p) for dtype in ("float32", "bfloat16") for p in (1, 2, 4)}
    assert not ring["check_failures"]
    assert all("ours_seconds" in row and "sdpa_seconds" in row for row in ring["timings"])
    loss = records["chunked_loss"]
    assert all("ours_seconds" in row and "naive_seconds" in row for row in loss["rows"])
    assert records["zero3_step"]["exported"] and len(records["zero3_step"]["step_lines"]) == 2
    assert all("tokens_per_s" in row for row in records["training_step"]["rows"])
