"""Ring attention under real multi-process gloo (P = 2 and 4) against plain SDPA in one process.

The reference is `F.scaled_dot_product_attention` on the full sequence with a block-diagonal
causal mask built here from the document lengths, independently of the ring code. It runs in
float64 on the same inputs, so a comparison measures the ring's own error: plain fp32 SDPA is
itself up to ~1.5e-6 off the exact result on gradients that cancel to ~0 when the output
gradient is O(1), which is why that gradient is scaled to keep the largest |dq|, |dk|, |dv|
near 0.5 (asserted), where the fp32 tolerance rtol=1e-5, atol=1e-6 is meaningful. Each world
size is one spawn whose workers run every check (process start-up dominates the run time);
the workers import this module, so transformers is imported only where a test needs it.
"""

from __future__ import annotations

import faulthandler
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from omnilong.config import StageParams
from omnilong.parallel.attention import ring_attention
from omnilong.parallel.documents import DocumentLayout
from omnilong.parallel.mesh import build_mesh
from omnilong.parallel.ring_attention_flash import UNAVAILABLE as FLASH_UNAVAILABLE
from omnilong.parallel.sample import shard_sample
from omnilong.parallel.zigzag import SequenceLayout, gather_sequence, shard_sequence, unshard_sequence
from tests.conftest import free_port

WORKER_TIMEOUT_S = 150  # a hung ring fails the test instead of blocking the suite
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    docs: str  # how the rows are packed, see `doc_lens`
    dtype: torch.dtype = torch.float32
    transformers_layout: bool = False  # q/k/v as transformers passes them: [B, S, H, D] in memory

    def seq_len(self, sp_size: int) -> int:
        return 32 * max(sp_size, 2)


CASES = [
    Case("causal", heads=4, kv_heads=4, head_dim=16, docs="one"),
    Case("gqa", heads=4, kv_heads=2, head_dim=64, docs="one"),
    Case("packed_uneven_gqa", heads=4, kv_heads=2, head_dim=80, docs="uneven"),
    Case("two_rows_mqa", heads=4, kv_heads=1, head_dim=128, docs="two_rows"),
    Case("transformers_layout", heads=4, kv_heads=2, head_dim=64, docs="uneven", transformers_layout=True),
    Case("bf16", heads=4, kv_heads=2, head_dim=64, docs="uneven", dtype=torch.bfloat16),
]


def doc_lens(docs: str, seq_len: int) -> list[list[int]]:
    if docs == "one":
        return [[seq_len]]
    # Short documents, one spanning several chunks, then padding. (A one-token document's dK is
    # zero in exact arithmetic, pure rounding noise in fp32: the tolerance cannot apply to it.)
    uneven = [3, seq_len // 2 + 5, 2, seq_len // 4 - 8]
    if docs == "uneven":
        return [uneven]
    return [uneven, [seq_len // 2 - 3, 7, seq_len // 2 - 4]]  # second row: no padding


def make_inputs(case: Case, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """q, k, v, and the output gradient of the full rows, fp32 (see the module docstring for the 0.25)."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(doc_lens(case.docs, seq_len))

    def randn(heads):
        return torch.randn(batch, heads, seq_len, case.head_dim, generator=generator)

    return {"q": randn(case.heads), "k": randn(case.kv_heads), "v": randn(case.kv_heads), "dout": randn(case.heads) / 4}


def reference_attention(inputs: dict[str, torch.Tensor], lens: list[list[int]]) -> dict[str, torch.Tensor]:
    """Output and dq, dk, dv (fp32) of plain SDPA in float64 on the full rows, block-diagonal causal mask."""
    q, k, v = (inputs[name].double().requires_grad_() for name in "qkv")
    seq_len = q.shape[2]
    masks = []
    for row_lens in lens:
        sizes = row_lens + ([seq_len - sum(row_lens)] if sum(row_lens) < seq_len else [])
        segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        masks.append((segment[:, None] == segment[None, :]).tril())
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.stack(masks)[:, None], enable_gqa=True)
    out.backward(inputs["dout"].double())
    return {name: t.float() for name, t in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}


def run_ring(case: Case, inputs: dict[str, torch.Tensor], layout: SequenceLayout, rank: int, group=None):
    """This rank's output and gradients (shards) for the full-row `inputs`."""
    documents = DocumentLayout(layout, rank, doc_lens(case.docs, layout.seq_len))
    local = {name: shard_sequence(t, layout, rank, dim=2).to(case.dtype) for name, t in inputs.items()}
    if case.transformers_layout:
        local = {name: t.transpose(1, 2).contiguous().transpose(1, 2) for name, t in local.items()}
    q, k, v = (local[name].requires_grad_() for name in "qkv")
    out = ring_attention(q, k, v, documents, group)
    assert out.shape == q.shape and out.dtype == case.dtype
    out.backward(local["dout"])
    return {"out": out.detach().float(), "dq": q.grad.float(), "dk": k.grad.float(), "dv": v.grad.float()}


# --- multi-process harness ------------------------------------------------------------------



def _bootstrap(rank, worker, world_size, port, out_dir):
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(worker(rank, world_size), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(worker, world_size: int, out_dir: Path) -> list:
    """Run `worker(rank, world_size)` in `world_size` fresh gloo processes; their results by rank."""
    mp.start_processes(
        _bootstrap, args=(worker, world_size, free_port(), str(out_dir)), nprocs=world_size, start_method="spawn"
    )
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


def _perturb_document(inputs: dict[str, torch.Tensor], lens: list[int], document: int) -> dict[str, torch.Tensor]:
    start = sum(lens[:document])
    end = start + lens[document]
    generator = torch.Generator().manual_seed(99)
    changed = {name: t.clone() for name, t in inputs.items()}
    for t in changed.values():
        t[..., start:end, :] = torch.randn(t[..., start:end, :].shape, generator=generator)
    return changed


def ring_worker(rank: int, world_size: int) -> dict:
    results = {}
    for case in CASES:
        layout = SequenceLayout(case.seq_len(world_size), world_size)
        results[case.name] = run_ring(case, make_inputs(case, layout.seq_len), layout, rank)
    # Leakage: change every input of document 1; nothing else may change, to the bit.
    case = CASES[2]
    layout = SequenceLayout(case.seq_len(world_size), world_size)
    perturbed = _perturb_document(make_inputs(case, layout.seq_len), doc_lens(case.docs, layout.seq_len)[0], 1)
    results["perturbed"] = run_ring(case, perturbed, layout, rank)
    # The distributed inverse of sharding.
    results["gathered_out"] = gather_sequence(results[case.name]["out"], layout, None, dim=2)
    if world_size == 4:
        results["mesh"] = mesh_checks(rank)
    else:
        results["model"] = tiny_model_shard(rank, world_size)
    return results


def mesh_checks(rank: int) -> dict:
    """World 4 as 2 (dp) x 2 (sp): groups, and ring attention on a sub-group with global rank peers."""
    with pytest.raises(ValueError, match=r"sp_size: expected a divisor of the world size 4, given 3"):
        build_mesh(StageParams(seq_len=96, sp_size=3), timeout_s=60)
    mesh = build_mesh(StageParams(seq_len=64, sp_size=2), timeout_s=60)
    members = {}
    for name, group in (("sp", mesh.sp_group), ("dp", mesh.dp_group)):
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
        dist.all_gather(gathered, torch.tensor([rank]), group=group)
        members[name] = [int(t) for t in gathered]
    case = CASES[2]
    layout = SequenceLayout(case.seq_len(2), 2)
    inputs = make_inputs(case, layout.seq_len, seed=10 + mesh.dp_rank)  # each group its own sequence
    ring = run_ring(case, inputs, layout, mesh.sp_rank, mesh.sp_group)
    return {
        "members": members, "dp_rank": mesh.dp_rank, "sp_rank": mesh.sp_rank,
        "sizes": (mesh.dp_size, mesh.sp_size), "ring": ring,
    }


# --- tiny transformers model through the adapter --------------------------------------------

MODEL_SEQ_LEN = 64
MODEL_DOC_LENS = [[5, 30, 1, 17]]  # then 11 tokens of padding


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM  # see the module docstring

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(config).float()


def model_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """input_ids, shifted labels, positions restarting per document (padding too), segments."""
    input_ids = torch.randint(0, 97, (1, MODEL_SEQ_LEN), generator=torch.Generator().manual_seed(1))
    sizes = MODEL_DOC_LENS[0] + [MODEL_SEQ_LEN - sum(MODEL_DOC_LENS[0])]
    segments, start = [], 0
    for size in sizes:
        segments.append((start, start + size))
        start += size
    labels = torch.full_like(input_ids, -100)
    position_ids = torch.zeros_like(input_ids)
    for start, end in segments[:-1]:  # no loss on padding
        labels[0, start : end - 1] = input_ids[0, start + 1 : end]
    for start, end in segments:
        position_ids[0, start:end] = torch.arange(end - start)
    return input_ids, labels, position_ids, segments


def tiny_model_shard(rank: int, world_size: int) -> dict:
    from omnilong.parallel.hf_adapter import ATTENTION_NAME, register_ring_attention, ring_attention_context

    register_ring_attention()
    model = tiny_qwen2()
    model.set_attn_implementation(ATTENTION_NAME)
    input_ids, labels, position_ids, _ = model_batch()
    layout = SequenceLayout(MODEL_SEQ_LEN, world_size)
    shard = shard_sample(input_ids, labels, position_ids, MODEL_DOC_LENS, layout, rank)
    with ring_attention_context(shard.documents, None):
        logits = model(input_ids=shard.inputs, position_ids=shard.position_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), shard.labels.flatten(), reduction="sum")
        loss.backward()
    return {
        "logits": logits.detach(),
        "loss": loss.detach(),
        "grads": {name: p.grad for name, p in model.named_parameters()},
    }


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """`spawned(world_size)`: the ring workers' results, each world size spawned once per module."""
    cache: dict[int, list] = {}

    def results(world_size: int) -> list:
        if world_size not in cache:
            cache[world_size] = spawn(ring_worker, world_size, tmp_path_factory.mktemp(f"ring{world_size}"))
        return cache[world_size]

    return results


def _unshard(results: list[dict], key: str, world_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    layout = SequenceLayout(seq_len, world_size)
    return {name: unshard_sequence([r[key][name] for r in results], layout, dim=2) for name in results[0][key]}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ring_equals_full_attention(spawned, world_size, case):
    results = spawned(world_size)
    seq_len = case.seq_len(world_size)
    inputs = make_inputs(case, seq_len)
    if case.dtype != torch.float32:  # the reference sees the same rounded inputs
        inputs = {name: t.to(case.dtype).float() for name, t in inputs.items()}
    expected = reference_attention(inputs, doc_lens(case.docs, seq_len))
    got = _unshard(results, case.name, world_size, seq_len)
    for name in ("dq", "dk", "dv"):
        assert expected[name].abs().max() > 0.3, f"{name} too small to test anything"
    for name in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name], expected[name], **TOLERANCE[case.dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_no_attention_across_documents(spawned, world_size):
    results = spawned(world_size)
    case = CASES[2]
    seq_len = case.seq_len(world_size)
    lens = doc_lens(case.docs, seq_len)[0]
    original = _unshard(results, case.name, world_size, seq_len)
    perturbed = _unshard(results, "perturbed", world_size, seq_len)
    start, end = lens[0], lens[0] + lens[1]
    others = torch.ones(seq_len, dtype=torch.bool)
    others[start:end] = False
    for name in ("out", "dq", "dk", "dv"):
        assert not torch.equal(original[name][:, :, start:end], perturbed[name][:, :, start:end]), name
        assert torch.equal(original[name][:, :, others], perturbed[name][:, :, others]), name


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_gather_sequence_inverts_sharding_across_processes(spawned, world_size):
    results = spawned(world_size)
    case = CASES[2]
    full = _unshard(results, case.name, world_size, case.seq_len(world_size))["out"]
    for rank_results in results:
        assert torch.equal(rank_results["gathered_out"], full)


@pytest.mark.slow
def test_mesh_groups_and_ring_on_a_subgroup(spawned):
    meshes = [r["mesh"] for r in spawned(4)]
    assert [(m["dp_rank"], m["sp_rank"]) for m in meshes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(m["sizes"] == (2, 2) for m in meshes)
    assert [m["members"]["sp"] for m in meshes] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [m["members"]["dp"] for m in meshes] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    case = CASES[2]
    layout = SequenceLayout(case.seq_len(2), 2)
    for dp_rank in range(2):  # each group attended over its own sequence
        inputs = make_inputs(case, layout.seq_len, seed=10 + dp_rank)
        expected = reference_attention(inputs, doc_lens(case.docs, layout.seq_len))
        group = [m["ring"] for m in meshes if m["dp_rank"] == dp_rank]
        for name in ("out", "dq", "dk", "dv"):
            got = unshard_sequence([g[name] for g in group], layout, dim=2)
            torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tiny_qwen2_through_the_adapter_equals_the_unsharded_model(spawned):
    """Logits, loss and every parameter gradient of a 2-rank ring equal each document run alone."""
    world_size = 2
    results = spawned(world_size)
    model = tiny_qwen2()
    input_ids, labels, _, segments = model_batch()
    logits = torch.cat([model(input_ids=input_ids[:, start:end]).logits for start, end in segments], dim=1)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    layout = SequenceLayout(MODEL_SEQ_LEN, world_size)
    ring_logits = unshard_sequence([r["model"]["logits"] for r in results], layout, dim=1)
    torch.testing.assert_close(ring_logits, logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(r["model"]["loss"] for r in results), loss.detach(), rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        ring_grad = sum(r["model"]["grads"][name] for r in results)
        torch.testing.assert_close(ring_grad, param.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


# --- single process -----------------------------------------------------------------------------


def test_a_single_process_ring_of_one_handles_packed_documents():
    case = CASES[2]
    layout = SequenceLayout(case.seq_len(1), 1)
    inputs = make_inputs(case, layout.seq_len)
    got = run_ring(case, inputs, layout, rank=0)
    expected = reference_attention(inputs, doc_lens(case.docs, layout.seq_len))
    for name in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


class _VisionAttention(torch.nn.Module):
    is_causal = False


def test_adapter_keeps_non_causal_vision_attention_local():
    from omnilong.parallel.hf_adapter import ring_attention_forward

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 16, generator=generator) for _ in range(3))
    out, weights = ring_attention_forward(_VisionAttention(), q, k, v, None, scaling=0.25)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    assert weights is None and torch.equal(out, expected)


def test_adapter_refuses_causal_calls_it_cannot_serve():
    from omnilong.parallel.hf_adapter import ring_attention_context, ring_attention_forward

    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="outside ring_attention_context"):
        ring_attention_forward(torch.nn.Module(), q, q, q, None)
    documents = DocumentLayout(SequenceLayout(8, 1), 0, [[8]])
    with ring_attention_context(documents, None):
        with pytest.raises(ValueError, match="expected attention_mask=None"):
            ring_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 8, 8, dtype=torch.bool))
        with pytest.raises(RuntimeError, match="already inside one"):
            with ring_attention_context(documents, None):
                pass


@pytest.mark.slow
@pytest.mark.skipif(
    FLASH_UNAVAILABLE is not None or torch.cuda.device_count() < 2,
    reason=f"ring_flash_attn backend needs flash-attn and 2+ GPUs: {FLASH_UNAVAILABLE or 'fewer than 2 GPUs'}",
)
def test_ring_flash_attn_backend_equals_full_attention(tmp_path):
    results = spawn(flash_worker, 2, tmp_path)
    for case, scheme in ((CASES[1], "zigzag"), (CASES[2], "contiguous")):
        seq_len = case.seq_len(2)
        inputs = {name: t.to(torch.bfloat16).float() for name, t in make_inputs(case, seq_len).items()}
        expected = reference_attention(inputs, doc_lens(case.docs, seq_len))
        layout = SequenceLayout(seq_len, 2, scheme)
        for name in ("out", "dq", "dk", "dv"):
            got = unshard_sequence([r[case.name][name] for r in results], layout, dim=2)
            torch.testing.assert_close(got, expected[name], **TOLERANCE[torch.bfloat16])


def flash_worker(rank: int, world_size: int) -> dict:
    """On GPU rank `rank`; gloo carries the results, NCCL the ring."""
    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl")
    results = {}
    for case, scheme in ((CASES[1], "zigzag"), (CASES[2], "contiguous")):
        layout = SequenceLayout(case.seq_len(world_size), world_size, scheme)
        documents = DocumentLayout(layout, rank, doc_lens(case.docs, layout.seq_len))
        local = {
            name: shard_sequence(t, layout, rank, dim=2).to("cuda", torch.bfloat16)
            for name, t in make_inputs(case, layout.seq_len).items()
        }
        q, k, v = (local[name].requires_grad_() for name in "qkv")
        out = ring_attention(q, k, v, documents, group, backend="ring_flash_attn")
        out.backward(local["dout"])
        results[case.name] = {
            name: t.detach().float().cpu() for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))
        }
    return results
