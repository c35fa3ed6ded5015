"""benchmarks/context_memory.py: its floor from the shapes, its fits, and one `--quick` run.

The floor tables below are written out by hand from the shapes (not computed by the code under
test): toy shapes hidden 64, 4 heads, 2 K/V heads (head dim 16), fp32, sp_size 2; Qwen2.5-7B's
shapes hidden 3,584, 28 heads, 4 K/V heads (head dim 128), bf16, sp_size 1, 28 layers.
"""

from __future__ import annotations


import pytest

from benchmarks.context_memory import (
    extrapolate_layers,
    fitted,
    floor_summary,
    floor_terms,
    linear_fit,
    longest_under,
    ours_params,
    parse_args,
    parse_train_options,
    resolved_slope,
)
from benchmarks.model_shapes import QWEN2_5_7B, TOY
from omnilong.config import ConfigError
from tests.conftest import REPO

# Bytes per token of the whole sequence, already divided by sp_size 2 (fp32: 4 bytes).
TOY_FLOOR_FP32_SP2 = {
    1: {"i_layer_checkpoints": 1 * 64 * 4 / 2,  # 128
        "ii_layer_input_grad": 128, "ii_layer_output_grad": 128, "ii_normed_input": 128,
        "ii_q_and_grad": 256, "ii_k_and_grad": 128, "ii_v_and_grad": 128,
        "ii_attention_output_and_grad": 256, "ii_attention_lse": 8, "iii_loss_hidden_grad": 128},
}
TOY_FLOOR_FP32_SP2[2] = {**TOY_FLOOR_FP32_SP2[1], "i_layer_checkpoints": 256}
TOY_TOTAL = {1: 1416, 2: 1544}

# Qwen2.5-7B, 28 layers, bf16, sp_size 1.
SEVEN_B_FLOOR = {"i_layer_checkpoints": 200704, "ii_layer_input_grad": 7168, "ii_layer_output_grad": 7168,
                 "ii_normed_input": 7168, "ii_q_and_grad": 14336, "ii_k_and_grad": 2048, "ii_v_and_grad": 2048,
                 "ii_attention_output_and_grad": 14336, "ii_attention_lse": 112, "iii_loss_hidden_grad": 7168}


def test_floor_terms_from_the_toy_shapes():
    for layers, expected in TOY_FLOOR_FP32_SP2.items():
        assert floor_terms(TOY, layers, 4, 2) == expected
        assert floor_summary(TOY, layers, 4, 2, False)["device_bytes_per_token"] == TOY_TOTAL[layers]


def test_floor_of_the_7b_shapes_and_offload_moves_checkpoints_to_host():
    assert floor_terms(QWEN2_5_7B, 28, 2, 1) == SEVEN_B_FLOOR
    on_device = floor_summary(QWEN2_5_7B, 28, 2, 1, False)
    offloaded = floor_summary(QWEN2_5_7B, 28, 2, 1, True)
    assert on_device["device_bytes_per_token"] == 262256 and on_device["host_bytes_per_token"] == 0
    assert offloaded["device_bytes_per_token"] == 61552 and offloaded["host_bytes_per_token"] == 200704


def test_fit_and_the_longest_length_under_a_cap():
    assert linear_fit([1, 2, 3], [12, 14, 16]) == pytest.approx((10, 2))
    assert longest_under(1000, 100, 7, 4) == 128  # (1000 - 100) / 7 = 128.6 -> 128
    assert longest_under(50, 100, 7, 4) is None
    with pytest.raises(ValueError, match="two distinct"):
        linear_fit([5, 5], [1, 2])


def test_a_slope_within_the_scatter_is_not_resolved():
    """The CPU run at Qwen2-0.5B's vocabulary (benchmarks/RESULTS.md): peaks set by the loss's fixed
    memory at every length, scattered, falling -> no per-token figure, ratio or longest length."""
    rows = [{"seq_len": n, "peak_bytes": peak} for n, peak in
            ((4096, 2714947584), (8192, 2461024256), (16384, 2737532928), (32768, 2419462144))]
    flat = fitted(rows, cap_bytes=16 * 2**30, multiple=4)
    assert flat["slope_bytes_per_token"] < 0 and not flat["slope_resolved"]
    assert resolved_slope(flat) is None and flat["longest_under_cap_extrapolated"] is None
    # Growth twice the RMS residual or more: resolved.
    growing = fitted([{"seq_len": n, "peak_bytes": 1000 + 10 * n + wobble} for n, wobble in
                      ((100, 30), (200, -30), (400, 30), (800, -30))], cap_bytes=1e5, multiple=4)
    assert growing["slope_resolved"] and resolved_slope(growing) == pytest.approx(10, rel=0.02)
    assert growing["longest_under_cap_extrapolated"] is not None
    # The same growth within a larger scatter: not.
    scattered = fitted([{"seq_len": n, "peak_bytes": 1000 + 10 * n + wobble} for n, wobble in
                        ((100, 4000), (200, -4000), (400, 4000), (800, -4000))], cap_bytes=1e5, multiple=4)
    assert 0 < scattered["slope_bytes_per_token"] and not scattered["slope_resolved"]


def test_whole_model_extrapolated_from_two_layer_counts():
    per_layers = {2: {"fixed_bytes": 10.0, "slope_bytes_per_token": 100.0},
                  4: {"fixed_bytes": 20.0, "slope_bytes_per_token": 180.0}}

    def floor_at(layers):
        return floor_summary(QWEN2_5_7B, layers, 2, 1, True)

    whole = extrapolate_layers(per_layers, 28, floor_at, cap_bytes=1e6, host_cap_bytes=1e9, multiple=2)
    # slope 20 + 40 x 28 = 1140, fixed 0 + 5 x 28 = 140: (1e6 - 140) / 1140 = 877.07 -> 876
    assert whole["extrapolated"] and whole["layers"] == 28
    assert whole["slope_bytes_per_token"] == pytest.approx(1140)
    assert whole["fixed_bytes"] == pytest.approx(140)
    assert whole["longest_under_cap"] == 876
    assert whole["longest_within_host_cap"] == int(1e9 // 200704) // 2 * 2  # 4982
    tight_host = extrapolate_layers(per_layers, 28, floor_at, cap_bytes=1e6, host_cap_bytes=200704 * 100, multiple=2)
    assert tight_host["longest_under_cap"] == 100


def test_train_options_nest_and_reach_the_params_validation():
    assert parse_train_options(["tiled_mlp.enabled=true", "lr=0.5"]) == {"tiled_mlp": {"enabled": True}, "lr": 0.5}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_train_options(["tiled_mlp"])
    raw = ours_params(REPO / "params.yaml", world=2, sp_size=2, seq_len=64, finetune="lora", precision="fp32",
                      train_options={"grad_clip": 2.0})
    assert raw["stages"]["stage1"]["train"]["grad_clip"] == 2.0
    assert raw["stages"]["stage1"]["train"]["finetune"] == "lora"
    with pytest.raises(ConfigError, match="no_such_option"):
        ours_params(REPO / "params.yaml", world=2, sp_size=2, seq_len=64, finetune="full", precision="fp32",
                    train_options={"no_such_option": 1})


def test_the_gpu_variant_is_selected_by_flags():
    args = parse_args(["--shapes", "7b", "--dtype", "bf16", "--finetune", "lora", "--layers", "2,4",
                       "--lengths", "131072,262144,524288", "--sp-size", "1", "--cap-gib", "139",
                       "--offload-activations"])
    assert (args.shapes, args.dtype, args.finetune, args.layers) == ("7b", "bf16", "lora", [2, 4])
    assert args.extrapolate_layers == 28 and args.lengths == [131072, 262144, 524288]
    with pytest.raises(SystemExit):
        parse_args(["--lengths", "1002", "--sp-size", "2"])  # not a multiple of 2 x sp_size


@pytest.mark.slow
def test_quick_run_measures_both_paths_and_prints_one_json_line(gpu_suite_quick):
    """`--quick`, as the GPU suite's CPU mode runs it (one run shared with tests/test_gpu_suite.py)."""
    summary = gpu_suite_quick["context_memory"]["result"]
    assert summary["benchmark"] == "context_memory" and summary["sp_size"] == 2 and summary["dtype"] == "fp32"
    assert [run["layers"] for run in summary["runs"]] == [1, 2]
    for run in summary["runs"]:
        assert run["floor"]["terms_bytes_per_token"] == TOY_FLOOR_FP32_SP2[run["layers"]]
        assert run["floor"]["device_bytes_per_token"] == TOY_TOTAL[run["layers"]]
        for path in ("naive", "ours"):
            rows = run[path]["rows"]
            assert [row["seq_len"] for row in rows] == [128, 256, 512]
            assert all(row["peak_bytes"] > 0 for row in rows)  # measured: a real step's peak
            assert {"fixed_bytes", "slope_bytes_per_token", "longest_under_cap_extrapolated"} <= set(run[path])
        assert all(len(row["peak_bytes_per_rank"]) == 2 for row in run["ours"]["rows"])
        # A slope lost in the peaks' scatter gives no ratio (test_a_slope_within_the_scatter_is_not_resolved).
        ours_slope = resolved_slope(run["ours"])
        naive_slope = resolved_slope(run["naive"])
        assert run["ours_over_floor"] == (None if ours_slope is None else pytest.approx(ours_slope / TOY_TOTAL[run["layers"]]))
        assert run["naive_over_ours"] == (None if None in (ours_slope, naive_slope)
                                          else pytest.approx(naive_slope / ours_slope))
    # The whole model is extrapolated from the per-layer slopes, so only when each was resolved: at
    # the toy lengths a CPU's allocator scatter can hide one (seen in CI at 46d9ba7).
    if any(resolved_slope(run["ours"]) is None for run in summary["runs"]):
        assert "whole_model" not in summary
        return
    whole = summary["whole_model"]
    assert whole["extrapolated"] and whole["layers"] == 4 and whole["from_layers"] == [1, 2]
