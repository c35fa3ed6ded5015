"""`make serve`: a Prefect server on 127.0.0.1 and the `omnilong` deployments served from here.

    prefect deployment run omnilong/full --watch
    prefect deployment run omnilong/ablation-no-stage2 --watch

Stopping (Ctrl-C or SIGTERM) stops serving first, then the server: in the other order the
runner hangs while it pauses its deployments on a server that is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

HOST = "127.0.0.1"
PORT = int(os.environ.get("OMNILONG_PREFECT_PORT", "4200"))
API_URL = f"http://{HOST}:{PORT}/api"


def start_server() -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(PORT)],
        start_new_session=True,  # its own process group: stopped as a whole, never by a stray Ctrl-C
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{API_URL}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"prefect server not healthy at {API_URL} after 120 s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    os.environ["PREFECT_API_URL"] = API_URL  # before Prefect reads its settings
    server = start_server()
    # SIGTERM stops serving the way Ctrl-C does, so the server is stopped after it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from prefect import serve

        from flows.pipeline import omnilong_pipeline

        print(f"Prefect server at http://{HOST}:{PORT}; serving omnilong/full and omnilong/ablation-no-stage2", flush=True)
        serve(
            omnilong_pipeline.to_deployment(name="full", parameters={"variant": "full"}),
            omnilong_pipeline.to_deployment(name="ablation-no-stage2", parameters={"variant": "no-stage2"}),
        )
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
