"""torchrun for a job of one node whose c10d stores listen on 127.0.0.1 only.

torch's TCPStore server takes no bind address: under `torchrun --standalone` the rendezvous store
and the store the ranks share listen on every network interface, so any host that reaches the
port could read or write the job's store. Run as torchrun itself
(`python -m omnilong.train.loopback_torchrun --standalone --local-addr 127.0.0.1 ...`), this
patches the two places torch's elastic agent creates those servers so that each is handed a
socket already listening on 127.0.0.1 (TCPStore's `master_listen_fd`). With `--local-addr
127.0.0.1` the ranks are told to meet at that address. One node only: several nodes must reach
their rendezvous from other machines (torch.distributed.run, unpatched).
"""

from __future__ import annotations

import socket
import sys

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous
from torch.distributed.run import main

LOOPBACK = "127.0.0.1"


def loopback_store(host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                   **options) -> TCPStore:
    """TCPStore(...) whose server (`is_master`) listens on 127.0.0.1 only; a client as TCPStore makes it."""
    if not is_master:
        return TCPStore(host_name, port, world_size, is_master, **options)
    try:
        listener = socket.create_server((LOOPBACK, port))
    except OSError as error:  # the port taken: what the rendezvous backend expects TCPStore to raise
        raise RuntimeError(f"cannot listen on {LOOPBACK}:{port}: {error}") from error
    store = TCPStore(host_name, listener.getsockname()[1], world_size, True,
                     master_listen_fd=listener.fileno(), **options)
    listener.detach()  # the store owns the socket now
    return store


def _shared_store_server(handler, master_addr: str, master_port: int) -> TCPStore:
    # As DynamicRendezvousHandler._create_tcp_store_server, on loopback.
    return loopback_store(master_addr, master_port, is_master=True, multi_tenant=True)


def patch_store_servers() -> bool:
    """Whether torch's elastic agent creates its store servers where this module patches them
    (torch 2.13 does: the one checked); then patched."""
    handler = dynamic_rendezvous.DynamicRendezvousHandler
    if not (hasattr(c10d_rendezvous_backend, "TCPStore") and hasattr(handler, "_create_tcp_store_server")):
        return False
    c10d_rendezvous_backend.TCPStore = loopback_store
    handler._create_tcp_store_server = _shared_store_server
    return True


if __name__ == "__main__":
    if not patch_store_servers():
        print("omnilong: this torch creates its c10d stores elsewhere: they listen on every interface",
              file=sys.stderr, flush=True)
    main()
