"""The training step under real ZeRO-3 on 2 gloo ranks equals one process on the whole batch.

Data parallel (sp_size 1): each rank trains its own rows. Sequence parallel (sp_size 2): both
ranks share each row, half of it each, with ring attention. The video cases train Qwen2.5-VL
and LLaVA-OneVision on rows holding a 256-frame and a 128-frame video with sp_size 2, each
rank decoding and encoding its share of the frames (omnilong/parallel/vision.py); their
reference is transformers' own forward (its vision path, its merge, its decoder), plain loss. Either way there are 2
accumulation micro-batches whose valid-token counts differ, and the step's update (SGD, lr 1,
so update = -gradient) must equal the gradient of the summed token loss over the step's rows
divided by their total valid tokens, computed by a plain model (SDPA, reference loss) in this
process. The same run checks that ZeRO-3 really partitions: each rank holds about half of the
parameters' elements.
"""

from __future__ import annotations

import pytest
import torch

from omnilong.config import LossParams, TrainParams
from omnilong.config import VideoTokenParams
from omnilong.train.batches import MicroBatch, collate
from omnilong.train.training_module import TrainingModule, model_inputs
from tests.conftest import run_ranks

pytestmark = pytest.mark.slow

SEQ_LEN = 48
WORLD = 2
ACCUMULATION = 2


def _rows(vocab_size: int) -> list[dict]:
    """4 packed rows with several documents, padding and different numbers of valid labels."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for row_no, doc_lens in enumerate([[20, 20], [30, 10], [48], [12, 12, 12]]):
        input_ids = torch.randint(0, vocab_size, (SEQ_LEN,), generator=generator)
        labels = input_ids.clone()
        start = 0
        for n in doc_lens:
            labels[start] = -100  # the packer masks each document's first token
            start += n
        labels[start:] = -100  # padding
        labels[: 4 * row_no] = -100  # a masked prompt of a different length per row
        positions = torch.cat([torch.arange(n) for n in doc_lens] + [torch.arange(SEQ_LEN - start)])
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": positions,
                     "doc_lens": torch.tensor(doc_lens)})
    return rows


VIDEO_FRAMES = [256, 128]  # one video per row, 64 x 64 (tiny Qwen2.5-VL: 2 tokens per frame)


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory) -> list[str]:
    from omnilong.data.synth.video import encode_mp4
    from tests.test_models_video_inputs import random_frames

    directory = tmp_path_factory.mktemp("long_videos")
    for number, frames in enumerate(VIDEO_FRAMES):
        encode_mp4(list(random_frames(frames, 64, 64, seed=number)), directory / f"long{number}.mp4", fps=4)
    return [str(directory / f"long{number}.mp4") for number in range(len(VIDEO_FRAMES))]


def _video_batches(family: str, model_config, paths: list[str], sp_rank: int = 0, sp_size: int = 1) -> list[MicroBatch]:
    """One micro-batch per video: a row with a chat-like document around it, a text document,
    padding; loaded as the data loader does for sequence-parallel rank `sp_rank`."""
    from pathlib import Path

    from tests.conftest import video_clip_row

    generator = torch.Generator().manual_seed(0)
    batches = []
    for path, num_frames in zip(paths, VIDEO_FRAMES):
        text = lambda n: torch.randint(10, 1000, (n,), generator=generator).tolist()  # noqa: E731
        # Qwen2.5-VL's template wraps a video in vision start/end tokens; LLaVA-OneVision's does not.
        start, end = ([model_config.vision_start_token_id], [model_config.vision_end_token_id]) \
            if family == "qwen2_5_vl" else ([], [])
        row = video_clip_row(Path(path), family, model_config, num_frames, text(8) + start, end + text(20),
                             seq_len_multiple=1)
        text_doc = torch.tensor(text(28))
        padding = -(len(row["input_ids"]) + len(text_doc)) % 4
        row["doc_lens"] = torch.tensor([len(row["input_ids"]), len(text_doc)])
        row["input_ids"] = torch.cat([row["input_ids"], text_doc, torch.zeros(padding, dtype=torch.long)])
        row["labels"] = torch.cat([row["labels"], torch.tensor([-100]), text_doc[1:], torch.full((padding,), -100)])
        lead = row["position_ids"].shape[:-1]  # (3,) for mRoPE, () for 1-D positions
        row["position_ids"] = torch.cat([row["position_ids"], torch.arange(len(text_doc)).expand(*lead, -1),
                                         torch.arange(padding).expand(*lead, -1)], dim=-1)
        batches.append(collate([row], family=family, model_config=model_config, video_params=VideoTokenParams(),
                               sp_rank=sp_rank, sp_size=sp_size))
    return batches


def _rows_of_rank(rank: int, sp_size: int) -> list[int]:
    """The row of each micro-batch: a data-parallel rank has its own; a sequence-parallel group shares."""
    dp_rank = rank // sp_size
    return [ACCUMULATION * dp_rank + micro for micro in range(ACCUMULATION)]


def _worker(rank: int, port: int, model_dir: str, family: str, sp_size: int, data, queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    from omnilong.config import StageParams
    from omnilong.models.loading import load_model
    from omnilong.parallel.hf_adapter import register_ring_attention
    from omnilong.parallel.mesh import build_mesh
    from omnilong.train.deepspeed_config import deepspeed_config
    from omnilong.train.runner import SequenceParallel, prepare_for_zero3, train_step

    deepspeed.init_distributed(dist_backend="gloo")
    train = TrainParams(grad_accum_steps=ACCUMULATION, micro_batch_size=1, grad_clip=1e9)
    config = deepspeed_config(train, data_parallel_size=WORLD, on_gpu=False)
    # Positions come from a weightless model, built before ZeRO-3's init takes over model building.
    video_batches = (_video_batches(family, AutoConfig.from_pretrained(model_dir), data, rank, sp_size)
                     if isinstance(data, list) else None)
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841  (from_pretrained partitions while it lives)
    model = load_model(model_dir, dtype=torch.float32)
    mesh = build_mesh(StageParams(seq_len=SEQ_LEN, sp_size=sp_size), timeout_s=300)
    sp = None
    if sp_size > 1:
        model.set_attn_implementation(register_ring_attention())
        sp = SequenceParallel(mesh.sp_group, mesh.sp_rank, mesh.sp_size, "torch")
    module = TrainingModule(model, family, LossParams(chunk_tokens=16))
    prepare_for_zero3(module)
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), config=config
    )
    local = sum(p.ds_tensor.numel() for p in module.parameters())
    total = sum(p.ds_numel for p in module.parameters())

    def gathered() -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {name: p.detach().clone() for name, p in module.model.named_parameters()}

    before = gathered()
    if video_batches is not None:
        batches = video_batches
    else:
        rows = _rows(model.config.text_config.vocab_size)
        batches = [collate([rows[row]], family=family, model_config=model.config, video_params=None)
                   for row in _rows_of_rank(rank, sp_size)]
    loss = train_step(engine, batches, family, torch.device("cpu"), sp).loss
    after = gathered()
    # numpy arrays travel by value; tensors would be shared through this (exiting) process.
    update = {name: (before[name] - after[name]).numpy() for name in before}
    queue.put((rank, local, total, loss, update if rank == 0 else None))
    dist.barrier()
    dist.destroy_process_group()



CASES = [("qwen2_5_vl", 1, "text"), ("qwen2_5_vl", 2, "text"), ("llava_onevision", 2, "text"),
         ("qwen2_5_vl", 2, "video"), ("llava_onevision", 2, "video")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{family}-sp{sp}-{data}" for family, sp, data in CASES])
def zero3_step(request, tiny_model_dir, long_videos):
    family, sp_size, data = request.param
    model_dir = tiny_model_dir(family)
    results = run_ranks(_worker, WORLD, str(model_dir), family, sp_size, long_videos if data == "video" else data)
    return family, sp_size, data, model_dir, results


def test_zero3_partitions_parameters_across_ranks(zero3_step):
    *_, results = zero3_step
    totals = {total for _, _, total, _, _ in results}
    assert len(totals) == 1
    [total] = totals
    for _, local, _, _, _ in results:
        assert 0.45 * total <= local <= 0.55 * total


def _transformers_video_loss(model, family: str, batches: list[MicroBatch]) -> tuple[torch.Tensor, int]:
    """transformers' own path: its video features and merge inside its forward, the plain loss."""
    from omnilong.loss.reference import reference_linear_cross_entropy
    from omnilong.train.training_module import language_model_positions

    loss_sum = valid = 0
    for batch in batches:
        [video] = batch.video_pieces
        hidden = model.model(
            input_ids=batch.input_ids, use_cache=False, **video,
            position_ids=language_model_positions(family, batch.position_ids, batch.doc_lens),
        ).last_hidden_state
        row_loss, row_valid = reference_linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight,
                                                             batch.labels.flatten())
        loss_sum, valid = loss_sum + row_loss, valid + row_valid
    return loss_sum, valid


def test_step_update_equals_single_process_gradient(zero3_step, long_videos):
    from omnilong.models.loading import load_model

    family, sp_size, data, model_dir, results = zero3_step
    update = results[0][4]
    model = load_model(model_dir, dtype=torch.float32)
    if data == "video":
        loss_sum, valid = _transformers_video_loss(model, family, _video_batches(family, model.config, long_videos))
    else:
        module = TrainingModule(model, family, LossParams(impl="reference"))
        rows = _rows(model.config.text_config.vocab_size)
        step_rows = sorted({row for rank in range(WORLD) for row in _rows_of_rank(rank, sp_size)})
        loss_sum = valid = 0
        for row in step_rows:
            batch = collate([rows[row]], family=family, model_config=model.config, video_params=None)
            row_loss, row_valid = module(**model_inputs(batch, family))
            loss_sum, valid = loss_sum + row_loss, valid + row_valid
    (loss_sum / valid).backward()

    assert results[0][3] == pytest.approx(float(loss_sum.detach() / valid), rel=1e-5)
    gradients = dict(model.named_parameters())
    assert set(update) == set(gradients)
    largest = max(float(p.grad.abs().max()) for p in gradients.values() if p.grad is not None)
    assert largest > 1e-3  # gradients that are not tiny
    if data == "video":
        vision = [p for name, p in gradients.items() if ("visual" in name or "vision_tower" in name) and p.grad is not None]
        assert max(float(p.grad.abs().max()) for p in vision) > 1e-4
    for name, param in gradients.items():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(torch.from_numpy(update[name]), expected, rtol=1e-4, atol=1e-6, msg=name)
