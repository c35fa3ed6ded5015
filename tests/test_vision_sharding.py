"""Sharded vision encoding (omnilong/parallel/vision.py) equals the model's own, unsharded encoding.

The reference is transformers' path: `get_video_features` on whole videos, merged into the token
embeddings with `masked_scatter` at the placeholders. Ours: 2 gloo ranks share each row zigzag,
each encodes about half of the batch's frames, all-gathers, and builds only its shard's input
embeddings. Each rank's embeddings must equal its shard of the reference, and the gradients of
a loss spread over both ranks' shards, summed over ranks (as data-parallel reduction does), must
equal the reference gradients: the gather's reduce-scatter backward routes each rank's share of
every frame's gradient back to the rank that encoded it.
"""

from __future__ import annotations

import pytest
import torch

from omnilong.config import LlavaVideoParams, VideoTokenParams
from omnilong.data.synth.video import encode_mp4
from omnilong.models.video_encoders import encode_units
from omnilong.models.video_inputs import num_video_tokens, preprocess_video, video_span
from omnilong.parallel.vision import split_frames, split_units, video_sources
from omnilong.parallel.zigzag import SequenceLayout, shard_sequence
from omnilong.train.batches import collate
from omnilong.train.training_module import video_shard
from tests.conftest import run_ranks, video_clip_row
from tests.test_models_video_inputs import random_frames

WORLD = 2
VIDEO = VideoTokenParams()
# (frames, height, width) of each row's videos: an odd frame count pads Qwen2.5-VL's last
# temporal patch; sizes differ so the videos' units carry different token counts.
ROW_VIDEOS = [(7, 64, 64), (9, 64, 96)]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def video_files(tmp_path_factory) -> list:
    directory = tmp_path_factory.mktemp("sharding_videos")
    paths = []
    for number, (frames, height, width) in enumerate(ROW_VIDEOS):
        paths.append(directory / f"video{number}.mp4")
        encode_mp4(list(random_frames(frames, height, width, seed=number)), paths[-1], fps=4)
    return paths


def _rows(family: str, config, video_files) -> list[dict]:
    """One row per video: text, the video's placeholders, text, padding to equal lengths."""
    rows = [video_clip_row(path, family, config, frames, list(range(20, 25 + number)), list(range(30, 33)))
            for number, (path, (frames, _, _)) in enumerate(zip(video_files, ROW_VIDEOS))]
    seq_len = max(len(row["input_ids"]) for row in rows) + 2 * WORLD
    for row in rows:
        padding = seq_len - len(row["input_ids"])
        row["input_ids"] = torch.nn.functional.pad(row["input_ids"], (0, padding))
        row["labels"] = torch.nn.functional.pad(row["labels"], (0, padding), value=-100)
        extra = torch.arange(padding).expand(*row["position_ids"].shape[:-1], -1) + 1000
        row["position_ids"] = torch.cat([row["position_ids"], extra], dim=-1)
    return rows


def _reference_embeddings(model, family: str, batch) -> torch.Tensor:
    """transformers' own video features of the whole videos, merged at the placeholders like its forward."""
    if family == "qwen2_5_vl":
        features = model.model.get_video_features(
            torch.cat([piece["pixel_values_videos"] for piece in batch.video_pieces]),
            torch.cat([piece["video_grid_thw"] for piece in batch.video_pieces]),
        ).pooler_output
        video_embeds = torch.cat(list(features))
    else:
        video_embeds = torch.cat([
            model.model.get_video_features(
                piece["pixel_values_videos"],
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            ).pooler_output[0]
            for piece in batch.video_pieces
        ])
    token_embeds = model.get_input_embeddings()(batch.input_ids)
    is_video = (batch.input_ids == batch.video_token_id)[..., None]
    return token_embeds.masked_scatter(is_video, video_embeds)


def _upstream_gradient(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, port: int, model_dir: str, family: str, video_files, queue) -> None:
    import os

    import torch.distributed as dist

    from omnilong.models.loading import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = load_model(model_dir, dtype=torch.float32)
    # Through the data loader's path: this rank decodes and preprocesses only its share of the frames.
    batch = collate(_rows(family, model.config, video_files), family=family, model_config=model.config,
                    video_params=VIDEO, sp_rank=rank, sp_size=WORLD)
    layout = SequenceLayout(batch.input_ids.shape[1], WORLD)
    shard = video_shard(batch, layout, rank)
    embeds = shard.embed(model, family, VIDEO, shard_sequence(batch.input_ids, layout, rank, dim=1))
    upstream = shard_sequence(_upstream_gradient((*batch.input_ids.shape, embeds.shape[-1])), layout, rank, dim=1)
    (embeds * upstream).sum().backward()
    gradients = {}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(grad)
        gradients[name] = grad.numpy()
    frames = [piece["pixel_values_videos"].shape[0 if family == "qwen2_5_vl" else 1] for piece in batch.video_pieces]
    queue.put((rank, embeds.detach().numpy(), frames, gradients if rank == 0 else None))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava_onevision"])
def sharded_run(request, tiny_model_dir, video_files):
    family = request.param
    model_dir = tiny_model_dir(family)
    results = run_ranks(_worker, WORLD, str(model_dir), family, video_files)
    return family, model_dir, results


@pytest.fixture(scope="module")
def reference(sharded_run, video_files):
    from omnilong.models.loading import load_model

    family, model_dir, _ = sharded_run
    model = load_model(model_dir, dtype=torch.float32)
    batch = collate(_rows(family, model.config, video_files), family=family, model_config=model.config,
                    video_params=VIDEO)
    embeds = _reference_embeddings(model, family, batch)
    (embeds * _upstream_gradient(embeds.shape)).sum().backward()
    return batch.input_ids, embeds.detach(), dict(model.named_parameters())


def test_each_rank_encodes_part_of_the_frames(sharded_run):
    family, _, results = sharded_run
    encoded = [sum(sizes) for _, _, sizes, _ in results]
    assert all(n > 0 for n in encoded)
    # Qwen2.5-VL counts patch rows, LLaVA-OneVision frames; together they are every video's.
    if family == "llava_onevision":
        assert sum(encoded) == sum(frames for frames, _, _ in ROW_VIDEOS)


def test_sharded_embeddings_equal_the_reference_shards(sharded_run, reference):
    _, _, results = sharded_run
    input_ids, embeds, _ = reference
    layout = SequenceLayout(input_ids.shape[1], WORLD)
    for rank, local, _, _ in results:
        torch.testing.assert_close(torch.from_numpy(local), shard_sequence(embeds, layout, rank, dim=1), **TOLERANCE)


def test_sharded_gradients_equal_the_reference(sharded_run, reference):
    family, _, results = sharded_run
    gradients = results[0][3]
    _, _, parameters = reference
    vision = [name for name in parameters if any(part in name for part in ("visual", "vision_tower", "projector", "newline"))
              and parameters[name].grad is not None]
    assert vision
    largest = max(float(parameters[name].grad.abs().max()) for name in vision)
    assert largest > 1e-3  # gradients that are not tiny
    for name, param in parameters.items():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(torch.from_numpy(gradients[name]), expected, **TOLERANCE, msg=name)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_runs_of_units_encode_like_the_whole_video(tiny_model_dir, family):
    from omnilong.models.loading import load_model

    model = load_model(tiny_model_dir(family), dtype=torch.float32).eval()
    frames = random_frames(9, 64, 64)
    span = video_span(family, model.config, VIDEO, 9, 64, 64)
    cut = 2 * span.frames_per_unit
    with torch.no_grad():
        whole = encode_units(model, family, VIDEO, [preprocess_video(family, frames, model.config, VIDEO)])
        split = encode_units(model, family, VIDEO, [preprocess_video(family, frames[:cut], model.config, VIDEO),
                                                    preprocess_video(family, frames[cut:], model.config, VIDEO)])
    torch.testing.assert_close(split, whole, **TOLERANCE)
    assert whole.shape[0] + span.trailing_tokens == span.num_tokens == num_video_tokens(family, model.config, VIDEO, 9, 64, 64)


@pytest.mark.parametrize("tokens_per_frame", [None, 1, 4, 9])
def test_llava_tokens_per_frame_is_what_the_encoder_gives(tiny_model_dir, tokens_per_frame):
    from omnilong.models.loading import load_model

    model = load_model(tiny_model_dir("llava_onevision"), dtype=torch.float32).eval()
    video = VideoTokenParams(llava_onevision=LlavaVideoParams(tokens_per_frame=tokens_per_frame))
    inputs = preprocess_video("llava_onevision", random_frames(5, 40, 60), model.config, video)
    with torch.no_grad():
        encoded = encode_units(model, "llava_onevision", video, [inputs])
    expected = num_video_tokens("llava_onevision", model.config, video, 5, 40, 60)
    assert encoded.shape[0] + 1 == expected
    if tokens_per_frame is not None:
        assert expected == 5 * tokens_per_frame + 1


def test_llava_tokens_per_frame_beyond_the_patch_grid_is_refused(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("llava_onevision"))
    video = VideoTokenParams(llava_onevision=LlavaVideoParams(tokens_per_frame=16))
    with pytest.raises(ValueError, match="tokens_per_frame: expected at most the vision tower's 3 x 3"):
        num_video_tokens("llava_onevision", config, video, 2, 40, 40)


@pytest.mark.parametrize(("tokens", "parts"), [([4] * 128, 2), ([16, 16, 4, 4, 4, 4], 2), ([1, 1, 10], 2), ([2] * 5, 4)])
def test_split_units_covers_every_unit_once_with_balanced_tokens(tokens, parts):
    ranges = split_units(tokens, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(tokens)
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(parts - 1))
    shares = [sum(tokens[a:b]) for a, b in ranges]
    assert max(shares) - min(shares) <= 2 * max(tokens)
    if len(set(tokens)) == 1 and len(tokens) % parts == 0:
        assert len(set(shares)) == 1


def test_split_frames_gives_each_rank_whole_units_of_each_video(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    spans = [video_span("qwen2_5_vl", config, VIDEO, 7, 64, 64), video_span("qwen2_5_vl", config, VIDEO, 9, 64, 96)]
    splits = [split_frames(spans, 2, rank) for rank in range(2)]
    assert splits[0].tokens_per_rank == splits[1].tokens_per_rank
    covered = [(video, unit) for split in splits for video, a, b in split.unit_ranges for unit in range(a, b)]
    assert covered == [(video, unit) for video, span in enumerate(spans) for unit in range(span.num_units)]
    assert [sum(spans[v].tokens_per_unit * (b - a) for v, a, b in split.unit_ranges) for split in splits] \
        == splits[0].tokens_per_rank


def test_fewer_units_than_ranks_encode_everything_on_every_rank(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    span = video_span("qwen2_5_vl", config, VIDEO, 2, 64, 64)
    splits = [split_frames([span], 4, rank) for rank in range(4)]
    assert all(split.unit_ranges == [(0, 0, 1)] and split.tokens_per_rank == [span.num_tokens] for split in splits)


def test_placeholder_count_mismatch_is_reported(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    span = video_span("qwen2_5_vl", config, VIDEO, 4, 64, 64)
    input_ids = torch.full((1, span.num_tokens - 1), config.video_token_id)
    with pytest.raises(ValueError, match=f"{span.num_tokens - 1} video placeholders, but the batch's 1 videos give {span.num_tokens}"):
        video_sources(input_ids, config.video_token_id, [span])
