"""``trtpipe compare ENGINE_DIR [--texts FILE] [--json report.json]``: the accuracy gate.

Encoders compare every output; text-generation engines get the decoder gate
(trtpipe.compare_decoder: teacher-forced next-token logits and greedy continuation).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("compare")
@click.argument("engine_dir")
@click.option(
    "--texts",
    type=click.Path(path_type=Path),
    help="Texts, one a line (default: built-in sentences).",
)
@click.option(
    "--random",
    "random_samples",
    type=click.IntRange(0),
    default=0,
    help="Use N random valid inputs instead of text.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Sequence length for --random.",
)
@click.option("--reference", help="Reference model (default: the manifest's source model).")
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(path_type=Path),
    help="Plain-tensor engines: an .npz with one array per input (batch first) instead of "
    "random inputs in the profile.",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON."
)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Device for the engine runner.")
@click.option("--max-abs", type=click.FloatRange(0), help="Override: maximum absolute error.")
@click.option(
    "--min-cosine", type=click.FloatRange(-1, 1), help="Override: minimum per-row cosine."
)
@click.option("--mean-cosine", type=click.FloatRange(-1, 1), help="Override: minimum mean cosine.")
@click.option(
    "--min-top1", type=click.FloatRange(0, 1), help="Override: minimum top-1 agreement (0..1)."
)
@click.option(
    "--new-tokens",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Decoders: teacher-forced steps and greedy tokens per prompt.",
)
@click.option(
    "--min-greedy",
    type=click.FloatRange(0, 1),
    help="Override (decoders): minimum greedy continuation match rate (0..1).",
)
def command(
    engine_dir: str,
    texts: Path | None,
    random_samples: int,
    seq_len: int,
    reference: str | None,
    json_path: Path | None,
    batch_size: int,
    device: str,
    max_abs: float | None,
    min_cosine: float | None,
    mean_cosine: float | None,
    min_top1: float | None,
    new_tokens: int,
    min_greedy: float | None,
    inputs_file: Path | None = None,
) -> None:
    """Compare ENGINE_DIR against its PyTorch model; exit 0 only within tolerance."""
    from trtpipe.cli.paths import check_output_file
    from trtpipe.compare import CompareReport, Tolerances, compare_engine
    from trtpipe.devices import parse_device
    from trtpipe.engine import EngineDir
    from trtpipe.errors import AccuracyError, InputError

    engine = EngineDir(engine_dir)
    if json_path:
        check_output_file(json_path, "--json")
    from trtpipe.generation.kv_cache import is_decoder

    decoder = is_decoder(engine.manifest.inputs)
    if decoder:
        from trtpipe.compare_decoder import DecoderTolerances

        tolerances: Tolerances = DecoderTolerances.for_precision(engine.manifest.precision)
    else:
        from click.core import ParameterSource

        given = click.get_current_context().get_parameter_source("new_tokens")
        if min_greedy is not None or given is ParameterSource.COMMANDLINE:
            raise InputError(
                "--new-tokens and --min-greedy apply to text-generation engines; "
                f"{engine.path} is a {engine.manifest.task} engine"
            )
        tolerances = Tolerances.for_precision(engine.manifest.precision)
    for field_name, value in (
        ("max_abs", max_abs),
        ("cosine_min", min_cosine),
        ("cosine_mean", mean_cosine),
        ("top1_min", min_top1),
        ("greedy_match_min", min_greedy),
    ):
        if value is not None:
            setattr(tolerances, field_name, value)
    if inputs_file is not None and engine.manifest.task != "tensor":
        raise InputError(
            f"--inputs is for plain-tensor engines; {engine_dir} is a {engine.manifest.task} "
            "engine (use --texts or --random)"
        )
    if inputs_file is not None:
        from trtpipe.compare_tensor import compare_tensor_engine

        report: CompareReport = compare_tensor_engine(
            engine,
            tolerances,
            random_samples,
            inputs_file,
            reference,
            batch_size,
            parse_device(device),
        )
    elif decoder:
        from trtpipe.compare_decoder import compare_decoder_engine

        report = compare_decoder_engine(
            engine,
            tolerances,
            texts_file=texts,
            new_tokens=new_tokens,
            reference=reference,
            batch_size=batch_size,
            device=parse_device(device),
            random_samples=random_samples,
        )
    else:
        report = compare_engine(
            engine,
            tolerances=tolerances,
            texts_file=texts,
            random_samples=random_samples,
            seq_len=seq_len,
            reference=reference,
            batch_size=batch_size,
            device=parse_device(device),
        )
    click.echo(report.table())
    if json_path:
        report.write_json(json_path)
        click.echo(f"wrote {json_path}")
    if not report.passed:
        raise AccuracyError("accuracy gate failed (see the table above)")
