"""The manifest's I/O dtypes are the engine's: read from the typed (post-precision) graph.

An fp16 graph that keeps fp16 KV-cache I/O (AutoCast without ``keep_io_types``, the layout that
saves the fp32 round trip of the cache) used to be described with the fp32 source graph's
dtypes, so decoder sessions fed it float32 caches and the first step failed with a dtype
mismatch. Here AutoCast really runs with ``keep_io_types=False`` (the build's default keeps
them) and the engine must describe and run itself as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.decoders import save_tiny_llama
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.devices import Device
from trtpipe.engine import EngineDir

PROMPTS = ["The King is dead. Long live the King.", "Once upon a time there was"]


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trtpipe.export import export_model

    root = tmp_path_factory.mktemp("typed-io-llama")
    model = save_tiny_llama(root / "model")
    return export_model(str(model), root / "onnx", task="text-generation-with-past")


def fp16_engine(onnx_path: Path, output: Path) -> EngineDir:
    return build_engine_dir(
        BuildConfig(
            onnx_path=onnx_path,
            output=output,
            precision="fp16",
            backend="onnxruntime",
            max_shapes={"input_ids": [4, 64]},
        )
    )


def prefill_logits_and_cache(engine: EngineDir) -> tuple[np.ndarray, list[np.ndarray]]:
    from trtpipe.generation.prompts import left_pad, position_ids, tokenize
    from trtpipe.generation.sessions import decoder_session
    from trtpipe.text import load_tokenizer

    ids, mask = left_pad(tokenize(load_tokenizer(str(engine.path)), PROMPTS), 0)
    session = decoder_session(engine, Device("cpu"))
    session.load()
    try:
        session.start(len(PROMPTS))
        logits = session.step(ids, mask, position_ids(mask))
        return logits, session.read_cache()
    finally:
        session.close()


def test_fp16_kv_io_is_described_as_fp16(
    llama_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import onnx
    from modelopt.onnx import autocast

    reference = fp16_engine(llama_onnx, tmp_path / "fp32-io")  # I/O kept fp32 (the default)
    real = autocast.convert_to_mixed_precision

    def fp16_io(**kwargs):
        return real(**{**kwargs, "keep_io_types": False})

    monkeypatch.setattr(autocast, "convert_to_mixed_precision", fp16_io)
    engine = fp16_engine(llama_onnx, tmp_path / "fp16-io")

    source = onnx.load(str(llama_onnx), load_external_data=False).graph
    source_dtypes = {v.name: v.type.tensor_type.elem_type for v in [*source.input, *source.output]}
    manifest = engine.manifest
    specs = {s.name: s.dtype for s in [*manifest.inputs, *manifest.outputs]}
    cache = [n for n in specs if n.startswith(("past_key_values", "present"))]
    assert len(cache) == 8  # 2 layers x key/value, in and out
    for name in cache:
        assert source_dtypes[name] == onnx.TensorProto.FLOAT  # what the old manifest said
        assert specs[name] == "float16", name
    assert specs["logits"] == "float16"
    assert specs["input_ids"] == specs["attention_mask"] == "int64"
    assert {s.dtype for s in reference.manifest.inputs if s.name in cache} == {"float32"}
    # The engine file agrees with its manifest...
    graph = onnx.load(str(engine.engine_path), load_external_data=False).graph
    engine_dtypes = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert {n for n in cache if engine_dtypes[n] == onnx.TensorProto.FLOAT16} == set(cache)
    # ...so a decoder session runs it with fp16 caches, and it computes what the fp32-I/O
    # engine computes (both fp16 inside).
    logits, kv = prefill_logits_and_cache(engine)
    want_logits, want_kv = prefill_logits_and_cache(reference)
    assert {a.dtype for a in kv} == {np.dtype(np.float16)}
    assert {a.dtype for a in want_kv} == {np.dtype(np.float32)}
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=2e-2)
    for got, want in zip(kv, want_kv, strict=True):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=2e-2)
    from trtpipe.generation import Generator, SamplingParams

    generator = Generator(engine)
    try:
        results = generator.generate(PROMPTS, SamplingParams(5, greedy=True))
    finally:
        generator.close()
    assert [len(r.token_ids) for r in results] == [5, 5]
