"""Served vs offline generation on a random Llama: make, export, build, serve, bench (not CI).

Runs the figures of docs/generation.md ("Served vs offline") in one go on the CPU:

1. a random LlamaForCausalLM (``--size 100m``: hidden 768, intermediate 3072, 12 layers,
   12 heads, ~114M parameters; ``--size tiny``: the test suite's tiny Llama), saved with the
   test suite's small tokenizer (nothing downloaded);
2. ``trtpipe export --task text-generation-with-past`` and an ONNX Runtime fp32 build;
3. ``trtpipe serve`` of that engine on a free port, then ``trtpipe bench --url ... --generate``
   (c1/c4/c16 streamed ``/v1/completions``, the offline ``Generator`` figure of the same engine
   before and after in the same command), the JSON kept in ``WORK/served-SIZE.json``.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_served_generation.py --size 100m
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRTPIPE = [sys.executable, "-m", "trtpipe.cli.main"]
SIZES = {
    "tiny": {"new_tokens": 64, "requests": 48},
    "100m": {"new_tokens": 16, "requests": 16},
}


def make_model(size: str, target: Path) -> Path:
    from tests.decoders import save_tiny_llama, save_tokenizer

    if size == "tiny":
        return save_tiny_llama(target)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target.mkdir(parents=True, exist_ok=True)
    save_tokenizer(target)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(target)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/served-generation"))
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--prepare-only", action="store_true", help="make and build, no bench")
    args = parser.parse_args()
    work: Path = args.work / args.size
    engine = work / "engine"
    if not (engine / "manifest.json").is_file():
        model = make_model(args.size, work / "model")
        export = work / "export"
        subprocess.run(
            [*TRTPIPE, "export", str(model), "--task", "text-generation-with-past", "-o",
             str(export)], check=True,
        )  # fmt: skip
        subprocess.run(
            [*TRTPIPE, "build", str(export / "model.onnx"), "--backend", "onnxruntime",
             "--max-shapes", "input_ids:16x128", "-o", str(engine)], check=True,
        )  # fmt: skip
    if args.prepare_only:
        return 0
    port = free_port()
    server = subprocess.Popen(
        [*TRTPIPE, "serve", "--name", f"llama={engine}", "--http-port", str(port),
         "--grpc-port", "0"],
    )  # fmt: skip
    try:
        wait_ready(port, server)
        plan = SIZES[args.size]
        result = work.parent / f"served-{args.size}.json"
        bench = [
            *TRTPIPE, "bench", "--url", f"127.0.0.1:{port}", "--generate", "--model", "llama",
            "--engine-dir", str(engine), "--max-new-tokens", str(plan["new_tokens"]),
            "--requests", str(plan["requests"]), "--concurrency", args.concurrency,
            "--json", str(result),
        ]  # fmt: skip
        return subprocess.run(bench).returncode
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
