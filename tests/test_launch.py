"""How `omnilong train` starts torchrun on one node and on several, and the DeepSpeed config of
hierarchical partitioning. The real two-agent run is in tests/test_train_stage.py."""

from __future__ import annotations

import pytest
from torch.distributed.run import get_args_parser

from omnilong.config import ParallelParams
from omnilong.train.deepspeed_config import deepspeed_config
from omnilong.train.launch import RDZV_ENDPOINT_ENV, RendezvousUnset, node_flags


def _torchrun_args(flags: tuple[str, ...]):
    """torchrun's own reading of the flags (as torch.distributed.run parses its command line)."""
    return get_args_parser().parse_args([*flags, "--nproc-per-node", "8", "-m", "omnilong.train.runner"])


def test_one_node_is_standalone(monkeypatch):
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "node0:29400")  # a rendezvous for several nodes only
    args = _torchrun_args(node_flags(ParallelParams()))
    assert args.standalone and args.nnodes == "1"


def test_several_nodes_meet_at_the_params_endpoint(monkeypatch):
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "elsewhere:1")  # the params win over torchrun's variable
    args = _torchrun_args(node_flags(ParallelParams(nnodes=4, nproc_per_node=8, rdzv_endpoint="node0:29400")))
    assert not args.standalone
    assert (args.nnodes, args.rdzv_backend, args.rdzv_endpoint) == ("4", "c10d", "node0:29400")
    assert args.rdzv_id == "omnilong"
    assert args.nproc_per_node == "8"


def test_several_nodes_meet_at_torchruns_variable_when_the_params_give_none(monkeypatch):
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "[fd00::1]:29400")
    args = _torchrun_args(node_flags(ParallelParams(nnodes=2, rdzv_id="job-7")))
    assert (args.rdzv_endpoint, args.rdzv_id) == ("[fd00::1]:29400", "job-7")


def test_several_nodes_without_an_endpoint_name_the_field(monkeypatch):
    monkeypatch.delenv(RDZV_ENDPOINT_ENV, raising=False)
    with pytest.raises(RendezvousUnset, match=rf"^parallel.rdzv_endpoint: expected host:port .*\(parallel.nnodes "
                       rf"is 2\), or torchrun's {RDZV_ENDPOINT_ENV} in the environment; given neither$"):
        node_flags(ParallelParams(nnodes=2))


def test_hierarchical_partition_spans_a_node():
    """ZeRO++ hpZ: the secondary partition is one node's ranks; off, the key is not written
    (DeepSpeed's default, 1: no secondary partition)."""
    from omnilong.config import TrainParams

    on = ParallelParams(nnodes=2, nproc_per_node=8, hierarchical_partition=True)
    config = deepspeed_config(TrainParams(), data_parallel_size=on.world_size, on_gpu=True,
                              hpz_partition_size=on.hpz_partition_size)
    assert config["zero_optimization"]["zero_hpz_partition_size"] == 8
    off = ParallelParams(nnodes=2, nproc_per_node=8)
    config = deepspeed_config(TrainParams(), data_parallel_size=off.world_size, on_gpu=True,
                              hpz_partition_size=off.hpz_partition_size)
    assert "zero_hpz_partition_size" not in config["zero_optimization"]
