"""`make demo`: the main job on the embedded all-MiniLM-L6-v2, on CPU.

Runs the same commands a user would type: export, build fp32/fp16/int8, compare (the accuracy
gate), then serves the engines and queries them with tritonclient. Everything lands in demo_out/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_out"
BIN = Path(sys.executable).parent
TRTPIPE = str(BIN / "trtpipe")
PRECISIONS = ("fp32", "fp16", "int8")


def run(*args: str) -> None:
    print(f"\n$ trtpipe {' '.join(args)}", flush=True)
    subprocess.run([TRTPIPE, *args], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("server did not become ready in time")


def accuracy_table() -> None:
    print("\nAccuracy vs PyTorch (built-in sentences, default gates)")
    print(f"{'engine':<14}{'output':<20}{'max_abs':>10}{'cos_min':>10}{'cos_mean':>10}  gate")
    for precision in PRECISIONS:
        report = json.loads((OUT / f"compare-{precision}.json").read_text())
        for name, figures in report["outputs"].items():
            verdict = "ok" if not figures["failures"] else "FAIL"
            print(
                f"{'minilm-' + precision:<14}{name:<20}{figures['max_abs']:>10.2e}"
                f"{figures['cosine_min']:>10.6f}{figures['cosine_mean']:>10.6f}  {verdict}"
            )


def serve_and_query() -> None:
    http_port, grpc_port = free_port(), free_port()
    engines = [str(OUT / "engines" / f"minilm-{p}") for p in PRECISIONS]
    command = [
        TRTPIPE,
        "serve",
        *engines,
        "--devices",
        "cpu:1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
    ]
    print(f"\n$ trtpipe serve {' '.join(command[2:])}", flush=True)
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(url, server)
        client = [
            sys.executable,
            str(ROOT / "scripts" / "demo_client.py"),
            "--url",
            f"127.0.0.1:{http_port}",
            "--model",
            "minilm-int8",
        ]
        print(f"\n$ python scripts/demo_client.py {' '.join(client[2:])}", flush=True)
        subprocess.run(client, check=True)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"\nSIGTERM: the server drained and exited with code {code}")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    run("export", "sentence-transformers/all-MiniLM-L6-v2", "-o", str(OUT / "minilm"))
    for precision in PRECISIONS:
        engine = OUT / "engines" / f"minilm-{precision}"
        run("build", str(OUT / "minilm" / "model.onnx"), f"--{precision}", "-o", str(engine))
    run("inspect", str(OUT / "engines" / "minilm-int8"))
    for precision in PRECISIONS:
        engine = OUT / "engines" / f"minilm-{precision}"
        run("compare", str(engine), "--json", str(OUT / f"compare-{precision}.json"))
    accuracy_table()
    if (ROOT / "trtpipe" / "server").is_dir() and (ROOT / "scripts" / "demo_client.py").is_file():
        serve_and_query()
    print(f"\nDone. Artifacts in {OUT}")


if __name__ == "__main__":
    main()
