"""The GPU suite's CPU mode (`--quick --device cpu`): every part runs at toy sizes, so the suite
cannot rot between GPU loans. The ZeRO-3 part trains in a project laid out as `make gpu-bundle`
lays it out, made from the session's prepared tiny project."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, project_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tiny_prepared, tmp_path_factory):
    from benchmarks.gpu_bundle import one_gpu_params

    params, root = tiny_prepared("qwen2_5_vl")
    raw = params.model_dump(mode="json")
    for key in ("raw_dir", "tokenized_dir", "packed_dir"):
        raw["data"][key] = str(root / raw["data"][key])
    raw["model"]["path"] = str(root / raw["model"]["path"])
    bundle = tmp_path_factory.mktemp("gpu_bundle")
    (bundle / "project").mkdir()
    (bundle / "project" / "params.yaml").write_text(yaml.safe_dump(one_gpu_params(raw)))
    return bundle


def test_every_part_runs_in_cpu_mode(bundle, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--quick", "--device", "cpu", "--out", str(out),
         "--bundle", str(bundle)],
        cwd=REPO, env=project_env(REPO), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = {record["part"]: record for record in map(json.loads, (out / "gpu_suite.jsonl").read_text().splitlines())}
    from benchmarks.gpu_suite import PARTS

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
