"""Real text, end to end: trtpipe's own batching against the common PyTorch recipe.

trtpipe tokenizes the whole input once (fast tokenizer, no padding), sorts the texts by token
length, cuts the sorted order into batches of up to the engine's maximum, pads each batch only
to its own longest text and scatters the outputs back to the original order. The common recipe
is what users run today: batches of 16 in the original order, padded to the longest text of the
batch with ``pad_to_multiple_of=8``. Both sides include tokenization in their time and process
every text exactly once; the counts are kept so a test can check it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtpipe.bench.common import SETTLE_S, alternate
from trtpipe.bench.stats import median, ratio
from trtpipe.engine import TensorSpec
from trtpipe.errors import InputError

log = logging.getLogger(__name__)

Infer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
RECIPE_BATCH = 16
RECIPE_MULTIPLE = 8
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class TextPass:
    """One pass over every text: wall time, batches and how much of the launch was padding."""

    seconds: float
    texts: int
    batches: int
    real_tokens: int
    launched_tokens: int
    counts: np.ndarray = field(repr=False)
    first_rows: np.ndarray | None = field(default=None, repr=False)

    @property
    def sentences_per_s(self) -> float:
        return self.texts / self.seconds

    @property
    def padding_ratio(self) -> float:
        """Share of launched token positions that were padding."""
        return 1.0 - self.real_tokens / self.launched_tokens if self.launched_tokens else 0.0


@dataclass
class TextSide:
    name: str
    recipe: str
    passes: list[TextPass]

    @property
    def seconds(self) -> float:
        return median([p.seconds for p in self.passes])

    @property
    def sentences_per_s(self) -> float:
        return self.passes[0].texts / self.seconds

    def to_dict(self) -> dict[str, Any]:
        last = self.passes[-1]
        return {
            "recipe": self.recipe,
            "sentences_per_s": self.sentences_per_s,
            "seconds_median": self.seconds,
            "seconds_runs": [p.seconds for p in self.passes],
            "batches": last.batches,
            "real_tokens": last.real_tokens,
            "launched_tokens": last.launched_tokens,
            "padding_ratio": last.padding_ratio,
            "texts_processed_once": bool(np.all(last.counts == 1)),
        }


@dataclass
class TextResult:
    texts: int
    max_length: int
    engine: TextSide
    baseline: TextSide | None
    extra: list[TextSide] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        if self.baseline is None:
            return None
        return ratio(self.engine.sentences_per_s, self.baseline.sentences_per_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "max_length": self.max_length,
            "engine": self.engine.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "speedup": self.speedup,
            "other_baselines": {
                side.name: {
                    **side.to_dict(),
                    "engine_speedup": ratio(self.engine.sentences_per_s, side.sentences_per_s),
                }
                for side in self.extra
            },
        }


def check_text_inputs(inputs: list[TensorSpec], task: str) -> None:
    """Text mode feeds only encoder-style inputs; decoders have ``--generate``."""
    if "text-generation" in task:
        raise InputError(
            f"this engine is a {task} model; benchmark it with --generate --prompts-file FILE"
        )
    unknown = [spec.name for spec in inputs if spec.name not in TEXT_INPUTS]
    if unknown:
        raise InputError(f"--texts cannot make input(s) {unknown}; use fixed shapes instead")


def plan_batches(
    lengths: np.ndarray, max_batch: int, max_padding: float = 0.1, free_tokens: int = 64
) -> list[np.ndarray]:
    """Indices sorted by length (stable), cut into batches of at most ``max_batch``.

    A batch also ends early when the next (longer) text would make more than ``max_padding``
    of the batch padding and more than ``free_tokens`` padded positions: the sparse long tail
    of real text then runs in small batches instead of padding 31 texts to the longest one.
    """
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, real = 0, 0
    for position, index in enumerate(order):
        length = int(lengths[index])
        rows = position - start
        if rows:
            padded = (rows + 1) * length
            waste = padded - (real + length)
            if rows >= max_batch or (waste > max_padding * padded and waste > free_tokens):
                batches.append(order[start:position])
                start, real = position, 0
        real += length
    if len(order) > start:
        batches.append(order[start:])
    return batches


def pad_batch(
    ids: list[list[int]],
    rows: np.ndarray,
    inputs: list[TensorSpec],
    pad_id: int,
    left: bool = False,
) -> dict[str, np.ndarray]:
    """Token ids of ``rows`` padded to the longest of them, as the engine's inputs."""
    width = max(len(ids[r]) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for out_row, row in enumerate(rows):
        tokens = ids[row]
        span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        input_ids[out_row, span] = tokens
        mask[out_row, span] = 1
    arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": mask * 0}
    return {spec.name: arrays[spec.name].astype(spec.dtype, copy=False) for spec in inputs}


def first_row_vectors(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Per row, a vector that identifies the row's result (pooled output or first token)."""
    value = np.asarray(outputs[name])
    return value[:, 0] if value.ndim >= 3 else value.reshape(value.shape[0], -1)


def sorted_pass(
    infer: Infer,
    tokenizer: Any,
    texts: list[str],
    inputs: list[TensorSpec],
    max_length: int,
    max_batch: int,
    keep_rows: str | None = None,
    left: bool = False,
) -> TextPass:
    """trtpipe's batching: tokenize once, sort by length, pad per batch, restore the order."""
    start = time.perf_counter()
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    lengths = np.fromiter((len(t) for t in encoded), dtype=np.int64, count=len(encoded))
    counts = np.zeros(len(texts), dtype=np.int64)
    first_rows: np.ndarray | None = None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = plan_batches(lengths, max_batch)
    launched = 0
    for rows in batches:
        feeds = pad_batch(encoded, rows, inputs, pad_id, left)
        outputs = infer(feeds)
        launched += feeds[inputs[0].name].size
        counts[rows] += 1
        if keep_rows:
            vectors = first_row_vectors(outputs, keep_rows)
            if first_rows is None:
                first_rows = np.zeros((len(texts), vectors.shape[1]), dtype=vectors.dtype)
            first_rows[rows] = vectors
    seconds = time.perf_counter() - start
    return TextPass(
        seconds, len(texts), len(batches), int(lengths.sum()), launched, counts, first_rows
    )


def recipe_pass(
    infer: Infer,
    tokenizer: Any,
    texts: list[str],
    inputs: list[TensorSpec],
    max_length: int,
    batch_size: int = RECIPE_BATCH,
    keep_rows: str | None = None,
    left: bool = False,
) -> TextPass:
    """The common recipe: original order, batch 16, pad to the batch's longest, multiple of 8."""
    start = time.perf_counter()
    counts = np.zeros(len(texts), dtype=np.int64)
    first_rows: np.ndarray | None = None
    real = launched = batches = 0
    side = "left" if left else tokenizer.padding_side
    for begin in range(0, len(texts), batch_size):
        chunk = texts[begin : begin + batch_size]
        encoded = tokenizer(
            chunk,
            padding="longest",
            truncation=True,
            max_length=max_length,
            pad_to_multiple_of=RECIPE_MULTIPLE,
            padding_side=side,
            return_tensors="np",
        )
        feeds = {}
        for spec in inputs:
            value = encoded.get(spec.name)
            if value is None:  # e.g. token_type_ids from a tokenizer that does not make them
                value = np.zeros_like(encoded["input_ids"])
            feeds[spec.name] = value.astype(spec.dtype, copy=False)
        outputs = infer(feeds)
        rows = np.arange(begin, begin + len(chunk))
        counts[rows] += 1
        real += int(encoded["attention_mask"].sum())
        launched += encoded["input_ids"].size
        batches += 1
        if keep_rows:
            vectors = first_row_vectors(outputs, keep_rows)
            if first_rows is None:
                first_rows = np.zeros((len(texts), vectors.shape[1]), dtype=vectors.dtype)
            first_rows[rows] = vectors
    seconds = time.perf_counter() - start
    return TextPass(seconds, len(texts), batches, real, launched, counts, first_rows)


def bench_text(
    engine_infer: Infer,
    baseline_infer: Infer | None,
    tokenizer: Any,
    texts: list[str],
    inputs: list[TensorSpec],
    max_length: int,
    max_batch: int,
    runs: int,
    warmup: int,
    left: bool = False,
    sorted_baseline: bool = False,
) -> TextResult:
    """Whole passes over ``texts``, engine and baseline alternating, ``runs`` each."""
    sides: list[tuple[str, str, Callable[[list[str]], TextPass]]] = [
        (
            "engine",
            f"trtpipe: sorted by length, batches up to {max_batch}, padded per batch",
            lambda items: sorted_pass(
                engine_infer, tokenizer, items, inputs, max_length, max_batch, left=left
            ),
        )
    ]
    if baseline_infer is not None:
        sides.append(
            (
                "baseline",
                f"PyTorch eager: original order, batch {RECIPE_BATCH}, padded to the batch's "
                f"longest (multiple of {RECIPE_MULTIPLE})",
                lambda items: recipe_pass(
                    baseline_infer, tokenizer, items, inputs, max_length, left=left
                ),
            )
        )
        if sorted_baseline:
            sides.append(
                (
                    "torch_sorted",
                    f"PyTorch eager with trtpipe's batching (sorted, batches up to {max_batch})",
                    lambda items: sorted_pass(
                        baseline_infer, tokenizer, items, inputs, max_length, max_batch, left=left
                    ),
                )
            )
    sample = texts[: min(len(texts), 4 * max_batch)]
    for _ in range(warmup):
        for _, _, run in sides:
            run(sample)
    passes: dict[str, list[TextPass]] = {name: [] for name, _, _ in sides}
    for index, engine_first in alternate(runs):
        order = sides if engine_first else sides[::-1]
        for name, _, run in order:
            result = run(texts)
            passes[name].append(result)
            log.info(
                "real text run %d/%d: %s %.1f sentences/s",
                index + 1,
                runs,
                name,
                result.sentences_per_s,
            )
            time.sleep(SETTLE_S)
    built = {name: TextSide(name, recipe, passes[name]) for name, recipe, _ in sides}
    return TextResult(
        texts=len(texts),
        max_length=max_length,
        engine=built["engine"],
        baseline=built.get("baseline"),
        extra=[built["torch_sorted"]] if "torch_sorted" in built else [],
    )
