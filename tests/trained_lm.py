"""Tiny language models trained for a minute on the bundled bench corpus (offline, CPU).

Random-weight decoders have nearly flat logits, so fp16/int8 top-1 agreement on them says little
(the top two logits are often closer than the rounding error). These models are trained just
long enough to have real margins: a byte-level BPE tokenizer and a 2-layer Llama or GPT-2 of
hidden 64, trained with a fixed seed and step count so every run makes the same model.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VOCAB = 512
BLOCK = 64
SPECIAL = ("<pad>", "<s>", "</s>")


def corpus_lines() -> list[str]:
    text = resources.files("trtpipe").joinpath("data/bench_corpus.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def save_corpus_tokenizer(target: Path, lines: list[str]) -> Any:
    """Byte-level BPE (<pad>=0, <s>=1, </s>=2) trained on the corpus, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    fast.save_pretrained(target)
    return fast


def make_model(arch: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **common,
        )
        return LlamaForCausalLM(config)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        for key, value in common.items():
            setattr(config, key, value)
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown architecture {arch!r}")


def train_tiny_lm(
    target: Path, arch: str = "llama", steps: int = 200, seed: int = 0, batch: int = 16
) -> Path:
    """Train ``arch`` on the bench corpus for ``steps`` AdamW steps; save model + tokenizer.

    The corpus is one stream of ``<s> sentence </s>`` cut into 64-token blocks, ``batch`` per
    step: 200 steps of 16 see about 1.5 passes over the corpus.
    """
    import torch

    target.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines()
    tokenizer = save_corpus_tokenizer(target, lines)
    stream: list[int] = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        stream += [1, *ids, 2]
    blocks = torch.tensor(stream[: len(stream) // BLOCK * BLOCK]).view(-1, BLOCK)
    torch.manual_seed(seed)
    model = make_model(arch).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        tokens = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    log.info(
        "trained %s: %d steps, final loss %.3f, %.1f s",
        arch,
        steps,
        float(loss.detach()),
        time.perf_counter() - start,
    )
    model.eval().save_pretrained(target)
    (target / "train_loss.txt").write_text(f"{float(loss.detach()):.4f}\n")
    return target


def export_decoder(model_dir: Path, target: Path) -> Path:
    """ONNX with KV-cache inputs (text-generation-with-past), as ``trtpipe export`` writes it."""
    from trtpipe.export import export_model

    return export_model(str(model_dir), target, task="text-generation-with-past")


def build_decoder(onnx_path: Path, out: Path, precision: str) -> Path:
    """ONNX Runtime engine dir: batch <= 8, prompt <= 64 tokens, past <= 128 positions."""
    import onnx

    from trtpipe.build import BuildConfig, build_engine_dir
    from trtpipe.build.profile import onnx_io_specs

    inputs, _ = onnx_io_specs(onnx.load(str(onnx_path), load_external_data=False))
    past = next(s for s in inputs if s.name == "past_key_values.0.key")
    build_engine_dir(
        BuildConfig(
            onnx_path=onnx_path,
            output=out,
            precision=precision,
            backend="onnxruntime",
            opt_shapes={"input_ids": [4, 16]},
            max_shapes={
                "input_ids": [8, 64],
                past.name: [8, past.shape[1], 128, past.shape[3]],
            },
        )
    )
    return out
