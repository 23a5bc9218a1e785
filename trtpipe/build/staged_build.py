"""``build --pipeline-stages N``: cut the graph (``stages`` for encoders, ``decoder_stages`` for
KV-cache decoders), build every stage as an ordinary engine dir, and chain them in one manifest.

Each stage gets the whole model's batch/sequence ranges for its own inputs, and with fp16/int8
the real boundary activations of the stages before it as reference/calibration inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trtpipe.build.decoder_stages import decoder_stage_models, plan_decoder_stages
from trtpipe.build.stages import STAGES_DIR, StagePlan, plan_stages, stage_models
from trtpipe.errors import InputError

log = logging.getLogger(__name__)


def kind_ranges(profile: dict[str, Any], inputs: list[Any]) -> dict[str, list[int]]:
    """{dim kind: [min, opt, max]} read off the whole model's profile."""
    ranges: dict[str, list[int]] = {}
    for spec in inputs:
        shape_range = profile.get(spec.name)
        if shape_range is None:
            continue
        for axis, kind in enumerate(spec.dims):
            if kind and kind not in ranges and spec.shape[axis] < 0:
                ranges[kind] = [
                    shape_range.min[axis],
                    shape_range.opt[axis],
                    shape_range.max[axis],
                ]
    return ranges


def stage_shapes(
    stage_inputs: list[Any], ranges: dict[str, Any]
) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, list[int]]]:
    """min/opt/max shapes for a stage's inputs with the whole model's batch/sequence ranges."""
    slots: tuple[dict[str, list[int]], ...] = ({}, {}, {})
    for spec in stage_inputs:
        if any(
            size < 0 and kind not in ranges
            for size, kind in zip(spec.shape, spec.dims, strict=True)
        ):
            continue  # a dim of unknown role: the profile code's defaults apply
        for slot in range(3):
            slots[slot][spec.name] = [
                size if size >= 0 else int(ranges[kind][slot])
                for size, kind in zip(spec.shape, spec.dims, strict=True)
            ]
    return slots[0], slots[1], slots[2]


def build_staged_engine_dir(config: Any) -> Any:
    """``build --pipeline-stages N``: cut, build every stage as an engine dir, chain them.

    The engine dir holds ``stages/0..N-1`` (each a complete engine dir with its own manifest)
    and a top-level manifest whose ``stages`` list chains them; it is written atomically.
    """
    import dataclasses
    import shutil

    import onnx

    from trtpipe.build import SIDE_FILES, build_engine_dir, load_onnx, resolve_backend
    from trtpipe.build.profile import build_profile, max_positions, onnx_io_specs
    from trtpipe.engine import EngineDir, Manifest, atomic_directory, sha256_file, write_manifest
    from trtpipe.export import TENSOR_TASK, ExportInfo, detect_build_task
    from trtpipe.generation.kv_cache import is_decoder
    from trtpipe.onnx_files import save_model, uses_external_data

    # The graph only (clear errors for a missing or broken file); weights are read per stage.
    model = load_onnx(config.onnx_path)
    model_dir = config.onnx_path.parent
    info = ExportInfo.read(model_dir)
    task = config.task or (info.task if info else detect_build_task(model_dir))
    inputs, _ = onnx_io_specs(model)
    if task == TENSOR_TASK:
        raise InputError(
            "--pipeline-stages cuts Hugging Face exports (encoders and KV-cache decoders), "
            "not plain tensor models"
        )
    decoder = is_decoder(inputs)
    backend = resolve_backend(config.backend)
    profile = build_profile(
        inputs, config.min_shapes, config.opt_shapes, config.max_shapes, max_positions(model_dir)
    )
    ranges = kind_ranges(profile, inputs)
    if decoder:  # each stage only its own layers' KV cache (trtpipe.build.decoder_stages)
        plans = plan_decoder_stages(model, config.pipeline_stages, config.stage_layers)
    else:
        plans = plan_stages(model, config.pipeline_stages, config.stage_layers)
    external = uses_external_data(config.onnx_path)
    # fp16 and int8: every stage gets real reference / calibration inputs, its boundary
    # activations computed by the fp32 stages before it on the calibration text (AutoCast's
    # random inputs would be wrong; int8 stage i>0 is calibrated on what stage i-1 feeds it).
    env = None
    if config.precision != "fp32":
        from trtpipe.build import calibration_feeds
        from trtpipe.precision import default_calibration_texts

        texts = (
            config.calib_texts if config.calib_texts is not None else default_calibration_texts()
        )
        env = calibration_feeds(model_dir, texts, inputs, profile)
    cut = decoder_stage_models if decoder else stage_models
    stages = cut(model, plans, model_dir if external else None)
    with atomic_directory(config.output, replaces="manifest.json") as tmp:
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        sources = tmp / ".stage-sources"
        stage_manifests = []
        for plan, stage_model in zip(plans, stages, strict=True):
            log.info(
                "stage %d: blocks %d-%d, %.1f MB of weights",
                plan.index,
                plan.first_layer,
                plan.last_layer,
                plan.weight_bytes / 1e6,
            )
            src = sources / str(plan.index)
            src.mkdir(parents=True)
            for name in ("config.json", "trtpipe_export.json"):
                if (model_dir / name).is_file():
                    shutil.copyfile(model_dir / name, src / name)
            save_model(stage_model, src / "model.onnx", external=external or None)
            del stage_model
            stage_inputs, _ = onnx_io_specs(
                onnx.load(str(src / "model.onnx"), load_external_data=False)
            )
            low, best, high = stage_shapes(stage_inputs, ranges)
            stage_config = dataclasses.replace(
                config,
                onnx_path=src / "model.onnx",
                output=tmp / STAGES_DIR / str(plan.index),
                backend=backend,
                task=task,
                min_shapes=low,
                opt_shapes=best,
                max_shapes=high,
                pipeline_stages=0,
                stage_layers=None,
                calibration_feeds={n: env[n] for n in plan.inputs} if env is not None else None,
            )
            if env is not None and plan is not plans[-1]:
                env.update(run_stage_source(src / "model.onnx", env, plan))
            stage_manifests.append(build_engine_dir(stage_config).manifest)
            shutil.rmtree(src)
        shutil.rmtree(sources)
        first = stage_manifests[0]
        # The graph's outputs in its order, from the stage that makes each (a decoder's
        # present.i.* come from the stage of block i, logits from the last).
        made = {spec.name: spec for m in stage_manifests for spec in m.outputs}
        manifest = Manifest(
            task=task,
            backend=backend,
            precision=config.precision,
            engine_file=STAGES_DIR,
            inputs=[s for s in inputs if any(s.name in p.inputs for p in plans)],
            outputs=[made[o.name] for o in model.graph.output if o.name in made],
            profile={k: v for k, v in profile.items() if any(k in p.inputs for p in plans)},
            source_model=info.source_model if info else "",
            library=info.library if info else "transformers",
            source_onnx_sha256=sha256_file(config.onnx_path),
            versions=dict(first.versions),
            device=dict(first.device),
            cpu_int8_family=first.cpu_int8_family,
            build_options={"pipeline_stages": len(plans), "stage_layers": config.stage_layers},
            stages=[plan.to_dict() for plan in plans],
        )
        write_manifest(tmp, manifest)
    log.info("wrote %d-stage engine dir %s", len(plans), config.output)
    return EngineDir(config.output)


def run_stage_source(path: Path, env: dict[str, Any], plan: StagePlan) -> dict[str, Any]:
    """Run a stage's fp32 source graph on CPU: the next stage's reference inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(plan.outputs, {name: env[name] for name in plan.inputs})
    return dict(zip(plan.outputs, values, strict=True))
