"""Sequence parallelism: process groups, zigzag sharding of packed samples, ring attention.

- `mesh`: data-parallel x sequence-parallel process groups.
- `zigzag`: which chunks of a sequence each rank holds; shard, unshard, gather.
- `documents`: document boundaries of packed rows and the kernel calls they allow per block.
- `sample`: one function that shards a packed batch for a rank, and its inverse.
- `ring_comm`: ring point-to-point exchange, the K/V chunk stream, the log-sum-exp merge.
- `lse_kernels`: PyTorch's attention kernels that return the log-sum-exp.
- `ring_attention_torch` / `ring_attention_flash`: the two backends; `attention` picks one.
- `hf_adapter`: plugs ring attention into transformers models via `AttentionInterface`.
"""
