"""Query a running ``trtpipe serve`` with tritonclient (HTTP) and print what comes back.

    python scripts/demo_client.py --url 127.0.0.1:8000 --model minilm-fp16

Sends server-side text (BYTES input ``text``), then pre-tokenized tensors (binary data), prints
output shapes, embedding similarities, the model's statistics and the average batch size.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

import numpy as np
import tritonclient.http as httpclient

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
]


def pooled(result: httpclient.InferResult, names: list[str]) -> np.ndarray:
    """Sentence vectors: the engine's pooled output, else masked mean of token embeddings."""
    if "sentence_embedding" in names:
        vectors = result.as_numpy("sentence_embedding")
    else:
        token_name = next(n for n in ("token_embeddings", "last_hidden_state") if n in names)
        hidden = result.as_numpy(token_name)
        mask = result.as_numpy("attention_mask")[..., None].astype(np.float32)
        vectors = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT of the HTTP endpoint")
    parser.add_argument("--model", required=True)
    args = parser.parse_args()

    client = httpclient.InferenceServerClient(args.url)
    print(f"server live={client.is_server_live()} ready={client.is_server_ready()}")
    meta = client.get_model_metadata(args.model)
    config = client.get_model_config(args.model)
    print(f"model {meta['name']} ({meta['platform']}), max_batch_size={config['max_batch_size']}")
    for tensor in meta["inputs"]:
        print(f"  input  {tensor['name']:<20} {tensor['datatype']:<6} {tensor['shape']}")
    for tensor in meta["outputs"]:
        print(f"  output {tensor['name']:<20} {tensor['datatype']:<6} {tensor['shape']}")
    output_names = [t["name"] for t in meta["outputs"]]

    # 1. raw text, tokenized on the server
    text = httpclient.InferInput("text", [len(SENTENCES)], "BYTES")
    text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=object))
    started = time.perf_counter()
    result = client.infer(args.model, [text])
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"\ntext request: {len(SENTENCES)} sentences in {elapsed_ms:.1f} ms")
    for name in [*output_names, "attention_mask"]:
        print(f"  {name}: shape {list(result.as_numpy(name).shape)}")
    if meta.get("parameters", {}).get("task") == "feature-extraction":
        vectors = pooled(result, output_names)
        sims = vectors @ vectors.T
        print("  cosine similarity to the first sentence:")
        for sentence, sim in zip(SENTENCES, sims[0], strict=True):
            print(f"    {sim:+.3f}  {sentence}")

    # 2. pre-tokenized tensors with the binary tensor data extension
    mask = result.as_numpy("attention_mask")
    length = int(mask[0].sum())
    inputs = []
    for tensor in meta["inputs"]:
        values = np.ones((1, length), dtype=np.int64)
        if tensor["name"] == "token_type_ids":
            values = np.zeros((1, length), dtype=np.int64)
        elif tensor["name"] == "input_ids":
            values = np.array([[101] + [2023] * (length - 2) + [102]], dtype=np.int64)
        item = httpclient.InferInput(tensor["name"], list(values.shape), tensor["datatype"])
        item.set_data_from_numpy(values, binary_data=True)
        inputs.append(item)
    tensor_result = client.infer(args.model, inputs)
    shapes = {n: list(tensor_result.as_numpy(n).shape) for n in output_names}
    print(f"\ntensor request (binary data): {shapes}")

    # 3. a burst of concurrent requests, then the statistics the server keeps
    burst = httpclient.InferenceServerClient(args.url, concurrency=16)
    handles = []
    for index in range(32):
        item = httpclient.InferInput("text", [1], "BYTES")
        sentence = SENTENCES[index % len(SENTENCES)]
        item.set_data_from_numpy(np.array([sentence.encode()], dtype=object))
        handles.append(burst.async_infer(args.model, [item]))
    for handle in handles:
        handle.get_result()
    burst.close()
    stats = client.get_inference_statistics(args.model)["model_stats"][0]
    inferences, executions = stats["inference_count"], stats["execution_count"]
    success = stats["inference_stats"]["success"]
    print(
        f"\nstatistics: {success['count']} requests ok, {inferences} inferences in "
        f"{executions} executions (average batch {inferences / max(executions, 1):.2f}), "
        f"mean request {success['ns'] / max(success['count'], 1) / 1e6:.2f} ms"
    )
    with urllib.request.urlopen(f"http://{args.url}/v2/health/ready") as response:
        devices = json.loads(response.read())["models"][args.model]["devices"]
    for device in devices:
        print(
            f"  {device['device']}: healthy={device['healthy']} "
            f"executions={device['executions']} inferences={device['inferences']}"
        )
    client.close()


if __name__ == "__main__":
    main()
