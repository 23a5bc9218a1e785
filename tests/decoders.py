"""Tiny random decoder models (Llama, GPT-2) with a tiny byte-level BPE tokenizer, offline.

The tokenizer is trained in the test on a few sentences, so nothing is downloaded; the models
are random, small (hidden 32-64, 2 layers) and saved with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = (
    "The King is dead. Long live the King.",
    "A quick brown fox jumps over the lazy dog.",
    "Engines generate text one token at a time, reusing the key value cache.",
    "Batched prompts of different lengths are padded on the left.",
    "Once upon a time there was a small model that wanted to speak.",
    "Numbers like 1, 2, 3 and 42 appear too; so do punctuation marks!",
)
SPECIAL = ("<pad>", "<s>", "</s>")


def save_tokenizer(target: Path, vocab_size: int = 320) -> None:
    """Byte-level BPE with <pad>=0, <s>=1, </s>=2, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    fast.save_pretrained(target)


def save_tiny_llama(target: Path, seed: int = 0, eos_token_id: int = 2) -> Path:
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads (2 KV heads), 256 positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target.mkdir(parents=True, exist_ok=True)
    save_tokenizer(target)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(target)
    return target


def save_tiny_gpt2(target: Path, seed: int = 0, eos_token_id: int = 2) -> Path:
    """GPT2LMHeadModel: hidden 32, 2 layers, 4 heads, 256 positions."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    target.mkdir(parents=True, exist_ok=True)
    save_tokenizer(target)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=320,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=0.2,  # the default 0.02 makes a random GPT-2 repeat one token
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(target)
    return target
