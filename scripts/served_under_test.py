"""The server a script measures: ``trtpipe serve`` of one engine, its start, the wait until it
is ready, its stop by SIGTERM, and whether its port is taken already (shared by
frontend_ceiling.py and compiled_c1_overhead.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` already (the server binds there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def serve_command(
    engine: Path, model: str, port: int, null_runner: bool, grpc_server: str = "auto"
) -> list[str]:
    """``trtpipe serve`` of one engine as ``model``, HTTP on ``port`` and gRPC on the next."""
    trtpipe = str(Path(sys.executable).parent / "trtpipe")
    command = [trtpipe, "serve", "--name", f"{model}={engine}"]
    command += ["--http-port", str(port), "--grpc-port", str(port + 1)]
    command += ["--grpc-server", grpc_server]
    return command + (["--null-runner"] if null_runner else [])


def start_server(command: list[str], server_log: Any) -> subprocess.Popen[str]:
    """``trtpipe serve ...`` with its log to ``server_log`` (a pipe nobody reads would stall
    a chatty server)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(command, env=env, stderr=server_log, text=True)


def wait_ready(server: subprocess.Popen[str], url: str, server_log: Any) -> int:
    """0 once the server says ready; else an exit code, with the reason printed."""
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:  # a bad engine dir, a port in use: it says why
            server_log.seek(0)
            lines = server_log.read().strip().splitlines() or ["(no output)"]
            print(f"error: the server exited: {lines[-1]}", file=sys.stderr)
            return 2
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return 0
        except OSError:
            time.sleep(0.5)
    print("error: the server did not become ready", file=sys.stderr)
    return 1


def stop_server(server: subprocess.Popen[str]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
