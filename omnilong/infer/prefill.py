"""Sequence-parallel prefill: a group of ranks shares a long prompt's decoder pass, as training does.

The prompt is padded to a multiple of 2P and zigzag-sharded like a training row
(omnilong/parallel/zigzag.py); the padding is a trailing document of its own, so no prompt token
sees it (and, after the prompt, it could only be seen by itself). Each rank runs the unmodified
decoder on its shard with ring attention (omnilong/parallel/hf_adapter.py), its keys and values
going into a `DynamicCache`. Then the group's first rank gathers every layer's keys and values,
puts them back in prompt order and drops the padding: a cache it decodes the answer's few tokens
from alone, with ordinary attention. Hidden states the answer needs (the last prompt token's, or
the teacher-forced answer's) reach every rank from whichever rank holds them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache

from omnilong.config import Family, RingBackend
from omnilong.parallel.documents import DocumentLayout
from omnilong.parallel.hf_adapter import ATTENTION_NAME, ring_attention_context
from omnilong.parallel.timeout import abort_nccl_on_timeout, as_timedelta
from omnilong.parallel.zigzag import SequenceLayout, shard_sequence, unshard_sequence
from omnilong.train.training_module import language_model_positions


@contextlib.contextmanager
def inference_group(sp_size: int, timeout_s: float) -> Iterator[dist.ProcessGroup | None]:
    """The sequence-parallel group to answer with: None for one process. For `sp_size` > 1,
    under torchrun: the job's process group (NCCL on this rank's GPU, else gloo), the whole job
    one group of `sp_size` ranks, left again on exit; a collective waits at most `timeout_s`."""
    if sp_size == 1:
        yield None
        return
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        abort_nccl_on_timeout()
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=as_timedelta(timeout_s))
    try:
        if dist.get_world_size() != sp_size:
            raise ValueError(f"eval.sp_size: expected the job's world size {dist.get_world_size()}, given {sp_size}")
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def from_first_rank(value: Any, group: dist.ProcessGroup) -> Any:
    """The group's first rank's `value` (any picklable object), on every rank of `group`."""
    message = [value]
    dist.broadcast_object_list(message, group=group, group_src=0)
    return message[0]


@contextlib.contextmanager
def ring_attention_implementation(model: nn.Module) -> Iterator[None]:
    """Inside the block the model's attention implementation is ring attention; after it, what it was."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass(frozen=True)
class PromptSplit:
    """A prompt of `length` tokens, padded to `layout.seq_len` and zigzag-sharded over `group`."""

    length: int
    layout: SequenceLayout
    rank: int
    group: dist.ProcessGroup
    backend: RingBackend

    @classmethod
    def over(cls, length: int, group: dist.ProcessGroup, backend: RingBackend) -> PromptSplit:
        size = dist.get_world_size(group)
        padded = -(-length // (2 * size)) * 2 * size
        return cls(length, SequenceLayout(padded, size), dist.get_rank(group), group, backend)

    @property
    def is_first(self) -> bool:
        """The rank that holds the gathered cache and decodes."""
        return self.rank == 0

    def shard(self, full: torch.Tensor, dim: int, fill: int = 0) -> torch.Tensor:
        """This rank's share of `full` (the prompt's `length` tokens along `dim`), padded with `fill`."""
        shape = list(full.shape)
        shape[dim] = self.layout.seq_len - self.length
        padded = torch.cat([full, full.new_full(shape, fill)], dim=dim)
        return shard_sequence(padded, self.layout, self.rank, dim=dim)

    def positions(self, family: Family, position_ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of the decoder's position ids for the prompt's `position_ids`
        ([L], or [3, L] for Qwen2.5-VL); the padding's restart at 0, as a packed row's do."""
        padding = torch.arange(self.layout.seq_len - self.length).expand(*position_ids.shape[:-1], -1)
        padded = torch.cat([position_ids, padding], dim=-1).unsqueeze(-2)
        return shard_sequence(language_model_positions(family, padded, [[self.length]]), self.layout, self.rank, dim=-1)

    def decoder(self, model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache | None = None) -> torch.Tensor:
        """[1, L_local, hidden] the language model's last hidden states of this rank's shard
        (`embeds`, `positions` from `shard` and `positions`), its keys and values into `cache`."""
        documents = DocumentLayout(self.layout, self.rank, [[self.length]])
        with ring_attention_implementation(model), ring_attention_context(documents, self.group, self.backend):
            return model.model(inputs_embeds=embeds, position_ids=positions.to(embeds.device), cache=cache,
                               use_cache=cache is not None).last_hidden_state

    def rows(self, local: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """[end - start, ...] rows [start, end) of the prompt, on every rank, from each rank's
        shard `local` [L_local, ...]: each row's holder writes it, the others add zeros (exact)."""
        held = shard_sequence(torch.arange(self.layout.seq_len), self.layout, self.rank, dim=0)
        mine = (held >= start) & (held < end)
        out = local.new_zeros((end - start, *local.shape[1:]))
        out[(held[mine] - start).to(local.device)] = local[mine.to(local.device)]
        dist.all_reduce(out, group=self.group)
        return out

    def gather_cache(self, cache: DynamicCache, config) -> DynamicCache | None:
        """On the first rank, the cache of the whole prompt in order, without padding, from every
        rank's `cache` of its shard; None on the others."""
        whole = DynamicCache(config=config) if self.is_first else None
        for index, layer in enumerate(cache.layers):
            keys, values = self._gather_first(layer.keys), self._gather_first(layer.values)
            if whole is not None:
                whole.update(keys, values, index)
        return whole

    def _gather_first(self, local: torch.Tensor) -> torch.Tensor | None:
        """[B, H, L, D] on the first rank from every rank's [B, H, L_local, D]; None elsewhere."""
        shards = [torch.empty_like(local) for _ in range(self.layout.sp_size)] if self.is_first else None
        dist.gather(local.contiguous(), shards, group=self.group, group_dst=0)
        if shards is None:
            return None
        return unshard_sequence(shards, self.layout, dim=2).narrow(2, 0, self.length)

