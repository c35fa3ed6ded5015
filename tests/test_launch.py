"""How `omnilong train` starts torchrun on one node and on several, and the DeepSpeed config of
hierarchical partitioning. The real two-agent run is in tests/test_train_stage.py.

Run as a module under torchrun, this file is the rank that reports what its job listens on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from omnilong.config import ParallelParams
from omnilong.train.deepspeed_config import deepspeed_config
from omnilong.train.launch import RDZV_ENDPOINT_ENV, RendezvousUnset, torchrun, torchrun_for_nodes

REPO = Path(__file__).resolve().parents[1]


def _torchrun_args(command: tuple[str, ...], launcher: str = "torch.distributed.run"):
    """torchrun's own reading of the command's options (as torch.distributed.run parses them)."""
    assert command[:2] == ("-m", launcher)
    return get_args_parser().parse_args([*command[2:], "--nproc-per-node", "8", "-m", "omnilong.train.runner"])


def test_one_node_is_standalone_on_loopback(monkeypatch):
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "node0:29400")  # a rendezvous for several nodes only
    args = _torchrun_args(torchrun_for_nodes(ParallelParams()), "omnilong.train.loopback_torchrun")
    assert args.standalone and args.nnodes == "1" and args.local_addr == "127.0.0.1"


def _listening(process) -> list[str]:
    import psutil

    return sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in process.net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN})


def _report_listening_sockets(report: Path) -> None:
    """Rank 0, once the job's process group is up: the addresses its torchrun agent listens on,
    and each rank's."""
    import psutil
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        agent = psutil.Process(os.getppid())
        report.write_text(json.dumps({"agent": _listening(agent),
                                      "ranks": [_listening(rank) for rank in agent.children()]}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_node_listens_on_loopback_only(tmp_path, monkeypatch):
    """The torchrun of `omnilong train` on one node: its agent's two c10d stores (the rendezvous's
    and the one its ranks share) and the ranks' gloo sockets listen on 127.0.0.1 only (under
    plain `torchrun --standalone` the stores listen on every interface)."""
    monkeypatch.chdir(REPO)
    report = tmp_path / "listening.json"
    assert torchrun("tests.test_launch", [str(report)], nproc_per_node=2) == 0
    listening = json.loads(report.read_text())
    assert len(listening["agent"]) == 2 and len(listening["ranks"]) == 2, listening
    addresses = [*listening["agent"], *(address for rank in listening["ranks"] for address in rank)]
    assert all(address.startswith("127.0.0.1:") for address in addresses), listening


def test_several_nodes_meet_at_the_params_endpoint(monkeypatch):
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "elsewhere:1")  # the params win over torchrun's variable
    args = _torchrun_args(torchrun_for_nodes(ParallelParams(nnodes=4, nproc_per_node=8, rdzv_endpoint="node0:29400")))
    assert not args.standalone
    assert (args.nnodes, args.rdzv_backend, args.rdzv_endpoint) == ("4", "c10d", "node0:29400")
    assert args.rdzv_id == "omnilong"
    assert args.nproc_per_node == "8"


def test_several_nodes_meet_at_torchruns_variable_when_the_params_give_none(monkeypatch):
    monkeypatch.setenv(RDZV_ENDPOINT_ENV, "[fd00::1]:29400")
    args = _torchrun_args(torchrun_for_nodes(ParallelParams(nnodes=2, rdzv_id="job-7")))
    assert (args.rdzv_endpoint, args.rdzv_id) == ("[fd00::1]:29400", "job-7")


def test_several_nodes_without_an_endpoint_name_the_field(monkeypatch):
    monkeypatch.delenv(RDZV_ENDPOINT_ENV, raising=False)
    with pytest.raises(RendezvousUnset, match=rf"^parallel.rdzv_endpoint: expected host:port .*\(parallel.nnodes "
                       rf"is 2\), or torchrun's {RDZV_ENDPOINT_ENV} in the environment; given neither$"):
        torchrun_for_nodes(ParallelParams(nnodes=2))


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


if __name__ == "__main__":
    _report_listening_sockets(Path(sys.argv[1]))
