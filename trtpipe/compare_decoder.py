"""Accuracy gate for text-generation (KV-cache) engines against their Hugging Face model.

Two checks on real prompts, both feeding the engine and the HF model the same token sequence:

- **Teacher-forced**: each text is cut into a prompt and ``new_tokens`` real continuation
  tokens. The engine prefills the prompt and then decodes one real token per step through its KV
  cache; HF runs the whole sequence in one forward pass. Per step (step 0 is the prefill's last
  position) the next-token logits are compared: top-1 agreement, cosine and max abs error.
- **Greedy continuation**: the engine decodes greedily from each prompt; HF scores the engine's
  sequence in one pass. The first position where HF's argmax differs from the engine's token is
  where HF ``generate`` would have diverged, so the match rate is exact without a second loop.

Cosine is taken on mean-centred logits: softmax ignores a constant shift of a row, so a shift
must not count as an error, and the large common component of LM logits must not hide one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.compare_report import CompareReport, OutputReport, Tolerances, gate_failures
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_NEW_TOKENS = 16


@dataclass
class DecoderTolerances(Tolerances):
    """Encoder thresholds on the ``logits`` output plus the greedy continuation match rate."""

    greedy_match_min: float | None = None

    @classmethod
    def for_precision(cls, precision: str) -> DecoderTolerances:
        """Defaults measured on tiny trained Llama/GPT-2 (docs/precision.md, Decoder engines)."""
        if precision == "fp32":
            return cls(max_abs=1e-3, cosine_min=0.99999, top1_min=1.0, greedy_match_min=1.0)
        if precision == "fp16":
            return cls(cosine_min=0.999, top1_min=0.98)
        if precision == "int8":
            return cls(cosine_min=0.99, cosine_mean=0.999, top1_min=0.98)
        raise InputError(f"unknown precision {precision!r}")


@dataclass
class StepReport:
    """Teacher-forced figures of one decode step over all prompts."""

    step: int
    positions: int
    top1_agreement: float
    cosine_min: float
    cosine_mean: float
    max_abs: float


@dataclass
class GreedyReport:
    """Greedy continuation: per prompt, how many tokens matched HF before the first divergence."""

    new_tokens: int
    match_rate: float
    first_divergence: list[int]
    exact: int
    failures: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class DecoderCompareReport(CompareReport):
    """The encoder report (``outputs["logits"]``) plus per-step and greedy figures."""

    steps: list[StepReport]
    greedy: GreedyReport
    disagreement_margin_max: float | None

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["decoder"] = {
            "steps": [asdict(s) for s in self.steps],
            "greedy": asdict(self.greedy),
            "disagreement_margin_max": self.disagreement_margin_max,
        }
        return data

    def table(self) -> str:
        from trtpipe.inspect import table

        rows = [
            [
                str(s.step),
                str(s.positions),
                f"{100 * s.top1_agreement:.1f}%",
                f"{s.cosine_min:.6f}",
                f"{s.cosine_mean:.6f}",
                f"{s.max_abs:.3g}",
            ]
            for s in self.steps
        ]
        header = ["step", "prompts", "top1", "cos_min", "cos_mean", "max_abs"]
        lines = ["teacher-forced next-token logits per step (0 = prefill):", table(rows, header)]
        g = self.greedy
        where = Counter(d for d in g.first_divergence if d < g.new_tokens)
        diverged = ", ".join(f"step {d}: {n}" for d, n in sorted(where.items()))
        lines.append(
            f"greedy continuation: {100 * g.match_rate:.1f}% of {g.new_tokens} tokens matched "
            f"before the first divergence; {g.exact}/{len(g.first_divergence)} prompts exact"
            + (f" (prompts first diverging at {diverged})" if diverged else "")
        )
        if self.disagreement_margin_max is not None:
            lines.append(
                "top-1 disagreements happen where HF's top-2 logit margin is at most "
                f"{self.disagreement_margin_max:.3g}"
            )
        base = super().table().splitlines()  # output table, failures, verdict
        lines += base[:-1]
        lines += [f"  greedy: {msg}" for msg in g.failures]
        lines.append(base[-1])
        return "\n".join(lines)


def centred_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per row of mean-centred rows (both constant rows count as equal)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dot = np.sum(a * b, axis=-1)
    return np.where(norm == 0, 1.0, dot / np.where(norm == 0, 1.0, norm))


def split_texts(
    tokenizer: Any, texts: Sequence[str], new_tokens: int, max_prompt: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the next ``new_tokens`` real ids) per text long enough to have both."""
    from trtpipe.generation.prompts import tokenize

    pairs = []
    for ids in tokenize(tokenizer, texts):
        if len(ids) < new_tokens + 1:
            continue
        cut = min(len(ids) - new_tokens, max_prompt)
        pairs.append((ids[:cut], ids[cut : cut + new_tokens]))
    if not pairs:
        raise InputError(
            f"no text has more than {new_tokens} tokens (--new-tokens) to teacher-force; "
            "give longer texts or fewer new tokens"
        )
    return pairs


def engine_teacher_forced(
    session: Any, prompts: list[list[int]], continuation: np.ndarray, pad: int
) -> np.ndarray:
    """Engine logits [B, T+1, V]: the prefill's last position, then one per fed real token."""
    from trtpipe.generation.prompts import left_pad, position_ids

    ids, mask = left_pad(prompts, pad)
    session.start(len(prompts))
    logits = [session.step(ids, mask, position_ids(mask))]
    for t in range(continuation.shape[1]):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=mask.dtype)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        logits.append(session.step(continuation[:, t : t + 1], mask, positions))
    return np.stack(logits, axis=1)


def engine_greedy(session: Any, prompts: list[list[int]], new_tokens: int, pad: int) -> np.ndarray:
    """Greedy token ids [B, new_tokens] from the engine (EOS ignored, as bench does)."""
    from trtpipe.generation.prompts import left_pad, position_ids

    ids, mask = left_pad(prompts, pad)
    session.start(len(prompts))
    logits = session.step(ids, mask, position_ids(mask))
    chosen = []
    for t in range(new_tokens):
        token = np.argmax(logits, axis=-1).astype(np.int64)[:, None]
        chosen.append(token)
        if t == new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=mask.dtype)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        logits = session.step(token, mask, positions)
    return np.concatenate(chosen, axis=1)


def hf_logits(
    model: Any, prompts: list[list[int]], continuation: np.ndarray, pad: int
) -> np.ndarray:
    """HF logits [B, T+1, V] at the same positions, from one pass over prompt + continuation."""
    import torch

    from trtpipe.generation.prompts import left_pad, position_ids

    ids, mask = left_pad(prompts, pad)
    width, new = ids.shape[1], continuation.shape[1]
    ids = np.concatenate([ids, continuation.astype(np.int64)], axis=1)
    mask = np.concatenate([mask, np.ones((len(prompts), new), dtype=mask.dtype)], axis=1)
    with torch.inference_mode():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(position_ids(mask)),
            use_cache=False,
        )
    return np.asarray(out.logits[:, width - 1 : width + new].float().numpy())


def load_hf_model(engine: EngineDir, reference: str | None) -> Any:
    """The causal LM the engine was exported from (or ``reference``), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    model_dir = reference or engine.manifest.source_model
    if not model_dir:
        raise InputError("the manifest names no source model; pass --reference MODEL_DIR")
    if not Path(model_dir).exists():
        from trtpipe.export import resolve_model

        model_dir = str(resolve_model(model_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load reference model {model_dir}: {first}") from exc
    return model.float().eval()


def compare_decoder_engine(
    engine: EngineDir,
    tolerances: Tolerances | None = None,
    texts_file: Path | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    reference: str | None = None,
    batch_size: int = 16,
    device: Device | None = None,
    random_samples: int = 0,
) -> DecoderCompareReport:
    """The whole ``compare`` for a decoder engine: teacher-forced and greedy, then the gate."""
    from trtpipe.generation.generator import special_ids
    from trtpipe.generation.prompts import chunks
    from trtpipe.generation.sessions import decoder_session
    from trtpipe.text import load_tokenizer, read_texts, sample_texts

    manifest = engine.manifest
    if random_samples:
        raise InputError(
            f"{engine.path} is a text-generation engine: its gate runs on real text "
            "(--texts FILE or the built-in sentences), not --random"
        )
    if new_tokens < 1 or batch_size < 1:
        raise InputError("--new-tokens and --batch-size must be >= 1")
    tol = tolerances or DecoderTolerances.for_precision(manifest.precision)
    texts = read_texts(texts_file) if texts_file else sample_texts()
    tokenizer = load_tokenizer(str(engine.path))
    _, pad = special_ids(engine.path, tokenizer)
    try:
        session = decoder_session(engine, device)
    except InputError as exc:
        raise InputError(
            f"{engine.path} is a text-generation (KV-cache) engine the decoder gate cannot run: "
            f"{exc}"
        ) from exc
    spec = session.spec
    max_prompt = min(spec.max_prompt, spec.max_total - new_tokens)
    if max_prompt < 1:
        raise InputError(
            f"--new-tokens {new_tokens} leaves no room for a prompt in the engine's total "
            f"length {spec.max_total}; use fewer"
        )
    pairs = split_texts(tokenizer, texts, new_tokens, max_prompt)
    log.info("decoder gate: %d prompts x %d teacher-forced steps", len(pairs), new_tokens)
    model = load_hf_model(engine, reference)
    engine_tf, hf_tf, divergence = [], [], []
    session.load()
    try:
        for part in chunks(pairs, min(batch_size, spec.max_batch)):
            prompts = [p for p, _ in part]
            continuation = np.asarray([c for _, c in part], dtype=np.int64)
            engine_tf.append(engine_teacher_forced(session, prompts, continuation, pad))
            hf_tf.append(hf_logits(model, prompts, continuation, pad))
            greedy = engine_greedy(session, prompts, new_tokens, pad)
            hf_choice = np.argmax(hf_logits(model, prompts, greedy, pad)[:, :-1], axis=-1)
            for row_engine, row_hf in zip(greedy, hf_choice, strict=True):
                differ = np.flatnonzero(row_engine != row_hf)
                divergence.append(int(differ[0]) if differ.size else new_tokens)
    finally:
        session.close()
    engine_logits = np.concatenate(engine_tf).astype(np.float64)
    reference_logits = np.concatenate(hf_tf).astype(np.float64)
    report = build_report(
        engine_logits,
        reference_logits,
        divergence,
        new_tokens,
        manifest.precision,
        tol,
        f"texts from {texts_file}" if texts_file else "built-in sentences",
    )
    if manifest.backend == "onnxruntime" and manifest.precision == "int8":
        from trtpipe.cpu_features import int8_kernel_family

        report.cpu_int8_family = int8_kernel_family()  # the verdict holds for this CPU kind
    return report


def build_report(
    engine_logits: np.ndarray,
    reference_logits: np.ndarray,
    divergence: list[int],
    new_tokens: int,
    precision: str,
    tolerances: Tolerances,
    inputs_label: str,
) -> DecoderCompareReport:
    """Metrics from logits [N, T+1, V] of both sides and the greedy divergence positions."""
    if engine_logits.shape != reference_logits.shape:
        raise InputError(
            f"logits: engine shape {engine_logits.shape} != reference {reference_logits.shape}"
        )
    diff = np.abs(engine_logits - reference_logits)
    cosine = centred_cosine(engine_logits, reference_logits)  # [N, T+1]
    top_engine = np.argmax(engine_logits, axis=-1)
    top_reference = np.argmax(reference_logits, axis=-1)
    agree = top_engine == top_reference
    steps = [
        StepReport(
            step=t,
            positions=int(agree.shape[0]),
            top1_agreement=float(agree[:, t].mean()),
            cosine_min=float(cosine[:, t].min()),
            cosine_mean=float(cosine[:, t].mean()),
            max_abs=float(diff[:, t].max()),
        )
        for t in range(agree.shape[1])
    ]
    margin = None
    if not agree.all():
        ordered = np.sort(reference_logits[~agree], axis=-1)
        margin = float((ordered[:, -1] - ordered[:, -2]).max())
    logits = OutputReport(
        max_abs=float(diff.max()),
        max_rel=float((diff / np.maximum(np.abs(reference_logits), 1e-6)).max()),
        cosine_min=float(cosine.min()),
        cosine_mean=float(cosine.mean()),
        rows=int(cosine.size),
        top1_agreement=float(agree.mean()),
    )
    logits.failures = gate_failures(logits, tolerances)
    match_rate = float(np.mean(divergence) / new_tokens)
    greedy = GreedyReport(
        new_tokens=new_tokens,
        match_rate=match_rate,
        first_divergence=divergence,
        exact=sum(d == new_tokens for d in divergence),
    )
    floor = getattr(tolerances, "greedy_match_min", None)
    if floor is not None and match_rate < floor:
        greedy.failures.append(f"match_rate {match_rate:.4f} < {floor:g}")
    return DecoderCompareReport(
        passed=not logits.failures and not greedy.failures,
        precision=precision,
        outputs={"logits": logits},
        tolerances=tolerances,
        samples=len(divergence),
        inputs=f"{inputs_label}, teacher-forced {new_tokens} steps",
        steps=steps,
        greedy=greedy,
        disagreement_margin_max=margin,
    )
