"""``trtpipe bench``: throughput and latency against PyTorch; scaling; online load; generation.

trtpipe bench ENGINE_DIR --baseline torch --batch-sizes 1,8,32 --seq-lens 32,128
trtpipe bench ENGINE_DIR --texts corpus.txt            # real text, end to end
trtpipe bench ENGINE_DIR --devices cpu:2               # or --gpus 0,1: scaling
trtpipe bench --url 127.0.0.1:8000 --model NAME --concurrency 1,4,16,64
trtpipe bench ENGINE_DIR --generate --prompts-file F --max-new-tokens 64
trtpipe bench --url 127.0.0.1:8000 --generate --model LLM --engine-dir DIR --concurrency 1,4,16
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

PATH = click.Path(path_type=Path)


@click.command("bench")
@click.argument("engine_dir", required=False, type=PATH)
@click.option(
    "--baseline",
    type=click.Choice(["torch", "none"]),
    default="torch",
    show_default=True,
    help="PyTorch eager (fp32 on CPU, fp16 on GPU) in the same run.",
)
@click.option("--batch-sizes", help="Fixed-shape batch sizes, e.g. 1,8,32.")
@click.option("--seq-lens", help="Fixed-shape sequence lengths, e.g. 32,128.")
@click.option(
    "--runs", type=click.IntRange(1), default=10, show_default=True, help="Timed calls per side."
)
@click.option(
    "--warmup", type=click.IntRange(0), default=2, show_default=True, help="Untimed calls first."
)
@click.option(
    "--threads", type=click.IntRange(1), help="CPU threads for each side (default: all cores)."
)
@click.option("--device", help="cpu or cuda:I (default: by the engine's backend).")
@click.option("--reference", help="Baseline model (default: the manifest's source model).")
@click.option("--texts", type=PATH, help="Real text, one per line: end-to-end sentences/s.")
@click.option(
    "--text-runs",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Whole passes over --texts per side.",
)
@click.option("--text-limit", type=click.IntRange(1), help="Use only the first N texts.")
@click.option(
    "--sorted-baseline",
    is_flag=True,
    help="Also time PyTorch with trtpipe's batching (how much is batching alone).",
)
@click.option("--devices", help="Scaling over CPU workers / devices: cpu:2, cpu:1,cpu:2.")
@click.option("--gpus", help="Scaling over GPUs: 0 / 0,1 / 0,1,2,3.")
@click.option(
    "--scaling-batches",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Batches per scaling run.",
)
@click.option("--gate", is_flag=True, help="Run the accuracy gate first and report it.")
@click.option("--gate-report", type=PATH, help="A compare --json report for this engine.")
@click.option("--url", help="Online mode: a running server, e.g. 127.0.0.1:8000.")
@click.option("--model", help="Online mode: the model name on the server.")
@click.option(
    "--concurrency",
    default="1,4,16,64",
    show_default=True,
    help="Online mode: concurrent clients per level.",
)
@click.option(
    "--requests",
    "max_requests",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Online mode: at most this many requests per level.",
)
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Online mode: at most this many seconds per level.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="Online mode: tokens per request.",
)
@click.option("--outputs", help="Online mode: outputs to request (default: all).")
@click.option(
    "--protocols",
    default="openai",
    show_default=True,
    help="Online mode with --texts: openai (base64 vectors, the openai SDK's default), "
    "openai-float, v2-text, v2-tokens, grpc-text, grpc-tokens.",
)
@click.option("--grpc-url", help="Online mode with --texts: the server's gRPC HOST:PORT.")
@click.option(
    "--grpc-client",
    type=click.Choice(["auto", "zttp", "tritonclient"]),
    default="auto",
    show_default=True,
    help="Online mode with --texts: what sends the gRPC protocols. zttp: the bench's own "
    "HTTP/2 channel, a third of tritonclient's CPU per request, so a level measures the "
    "server (needs Python 3.11+); tritonclient: tritonclient.grpc.aio, what Triton users run; "
    "auto: zttp where it is installed.",
)
@click.option(
    "--engine-dir",
    "served_engine",
    type=PATH,
    help="Online mode: the served engine, for the offline and direct-call comparison.",
)
@click.option("--generate", is_flag=True, help="Generation mode: tokens/s and TTFT vs HF.")
@click.option("--prompts-file", type=PATH, help="Generation mode: prompts, one per line.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Generation mode: new tokens per prompt.",
)
@click.option("--json", "json_path", type=PATH, help="Write every figure and the machine.")
@click.option("--plot", "plot_path", type=PATH, help="Write a PNG plot.")
def command(engine_dir: Path | None, **options: Any) -> None:
    """Benchmark ENGINE_DIR against PyTorch, or a running server with --url."""
    from trtpipe.bench.report import write_plot
    from trtpipe.cli.paths import check_output_file
    from trtpipe.errors import InputError
    from trtpipe.jsonfile import write_json

    json_path, plot_path = options.pop("json_path"), options.pop("plot_path")
    _check_mode_options(engine_dir, options)
    if json_path:
        check_output_file(json_path, "--json")
    if plot_path:
        check_output_file(plot_path, "--plot")
    if options["url"] and options["generate"]:
        from trtpipe.bench.served_generation import run_from_options

        result, table = run_from_options(options)
        click.echo(table)
        if json_path:
            write_json(json_path, result)
            click.echo(f"wrote {json_path}")
        return
    if options["url"]:
        report = _online(options)
    elif engine_dir is None:
        raise InputError("give an ENGINE_DIR to benchmark, or --url and --model for a server")
    elif options["generate"]:
        report = _generation(engine_dir, options)
    else:
        from trtpipe.bench.suite import BenchConfig, run_bench

        scaling = bool(options["devices"] or options["gpus"])
        asked_fixed = bool(options["batch_sizes"] or options["seq_lens"])
        config = BenchConfig(
            engine_dir=engine_dir,
            baseline=options["baseline"],
            batch_sizes=_ints(options["batch_sizes"], "--batch-sizes"),
            seq_lens=_ints(options["seq_lens"], "--seq-lens"),
            fixed=not scaling and (asked_fixed or not options["texts"]),
            runs=options["runs"],
            warmup=options["warmup"],
            threads=options["threads"],
            device=options["device"],
            reference=options["reference"],
            texts=options["texts"],
            text_runs=options["text_runs"],
            text_limit=options["text_limit"],
            sorted_baseline=options["sorted_baseline"],
            devices=options["devices"],
            gpus=options["gpus"],
            scaling_batches=options["scaling_batches"],
            gate=options["gate"],
            gate_report=options["gate_report"],
        )
        report = run_bench(config)
    from trtpipe.bench.suite import render

    click.echo(render(report))
    if json_path:
        write_json(json_path, report)
        click.echo(f"wrote {json_path}")
    if plot_path:
        write_plot(plot_path, report)
        click.echo(f"wrote {plot_path}")


# Options that only one or two of the modes read: given in another mode they would be ignored.
MODE_OPTIONS = {
    "online": {
        "model": "--model",
        "concurrency": "--concurrency",
        "max_requests": "--requests",
        "duration": "--duration",
        "seq_len": "--seq-len",
        "outputs": "--outputs",
        "served_engine": "--engine-dir",
        "protocols": "--protocols",
        "grpc_url": "--grpc-url",
        "grpc_client": "--grpc-client",
    },
    "generation": {"prompts_file": "--prompts-file", "max_new_tokens": "--max-new-tokens"},
    "offline": {
        "seq_lens": "--seq-lens",
        "text_runs": "--text-runs",
        "sorted_baseline": "--sorted-baseline",
        "devices": "--devices",
        "gpus": "--gpus",
        "scaling_batches": "--scaling-batches",
    },
    # --texts online: batch-1 requests of real sentences (trtpipe.bench.served_text).
    "offline+online": {"texts": "--texts", "text_limit": "--text-limit"},
    "offline+generation": {
        "baseline": "--baseline",
        "batch_sizes": "--batch-sizes",
        "warmup": "--warmup",
        "device": "--device",
        "reference": "--reference",
        "gate": "--gate",
        "gate_report": "--gate-report",
    },
}


def _check_mode_options(engine_dir: Path | None, options: dict[str, Any]) -> None:
    """One mode per run (online with --url, generation with --generate, offline otherwise);
    an option of another mode is a mistake to name, not something to ignore."""
    from click.core import ParameterSource

    from trtpipe.errors import InputError

    if options["url"] and options["generate"]:
        if engine_dir is not None:
            raise InputError(
                f"--url --generate benchmarks a server's generation model; give the served "
                f"engine as --engine-dir {engine_dir} for the offline figure"
            )
        return  # served generation: see trtpipe.bench.served_generation.run_from_options
    mode = "online" if options["url"] else "generation" if options["generate"] else "offline"
    if mode == "online" and engine_dir is not None:
        raise InputError(
            f"--url benchmarks a running server; give the served engine as --engine-dir "
            f"{engine_dir} (for the offline comparison), or drop --url to benchmark it offline"
        )
    ctx = click.get_current_context()
    for modes, params in MODE_OPTIONS.items():
        if mode in modes.split("+"):
            continue
        for param, option in params.items():
            if ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE:
                where = " or ".join(MODE_NAMES[m] for m in modes.split("+"))
                raise InputError(f"{option} applies to {where}, not to {MODE_NAMES[mode]}")


MODE_NAMES = {
    "online": "the online mode (--url)",
    "generation": "the generation mode (--generate)",
    "offline": "the offline mode (ENGINE_DIR)",
}


def _ints(text: str | None, option: str) -> list[int] | None:
    from trtpipe.bench.common import parse_int_list

    return parse_int_list(text, option) if text else None


def _online(options: dict[str, Any]) -> dict[str, Any]:
    from trtpipe.bench.online import OnlineConfig, run_online
    from trtpipe.errors import InputError

    if not options["model"]:
        raise InputError("--url needs --model NAME (the model's name on the server)")
    if options["texts"]:
        return _served_text(options)
    concurrency = _ints(options["concurrency"], "--concurrency")
    assert concurrency is not None
    config = OnlineConfig(
        url=options["url"],
        model=options["model"],
        concurrency=concurrency,
        max_requests=options["max_requests"],
        duration_s=options["duration"],
        seq_len=options["seq_len"],
        outputs=[o.strip() for o in options["outputs"].split(",")] if options["outputs"] else None,
        engine_dir=options["served_engine"],
        threads=options["threads"],
        runs=options["runs"],
    )
    return run_online(config)


def _served_text(options: dict[str, Any]) -> dict[str, Any]:
    """--url with --texts: batch-1 requests of real sentences, beside the engine offline."""
    from trtpipe.bench.served_text import ServedTextConfig, run_served_text
    from trtpipe.errors import InputError
    from trtpipe.text import read_texts

    if not options["served_engine"]:
        raise InputError("--url with --texts needs --engine-dir (the served engine, offline)")
    texts = read_texts(options["texts"])
    if options["text_limit"]:
        texts = texts[: options["text_limit"]]
    concurrency = _ints(options["concurrency"], "--concurrency")
    assert concurrency is not None
    return run_served_text(
        ServedTextConfig(
            url=options["url"],
            model=options["model"],
            texts=texts,
            engine_dir=options["served_engine"],
            concurrency=concurrency,
            protocols=[p.strip() for p in options["protocols"].split(",") if p.strip()],
            grpc_url=options["grpc_url"],
            grpc_client=options["grpc_client"],
            max_requests=options["max_requests"],
            duration_s=options["duration"],
            threads=options["threads"],
        )
    )


def _generation(engine_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    from trtpipe.bench.generation import run_generation
    from trtpipe.devices import parse_device
    from trtpipe.gate import decoder_gate_status

    # The decoder gate first (teacher-forced logits and greedy tokens vs HF), like offline.
    gate = decoder_gate_status(
        engine_dir,
        options["gate"],
        options["gate_report"],
        parse_device(options["device"]) if options["device"] else None,
        options["reference"],
    )
    report = run_generation(
        engine_dir,
        prompts_file=options["prompts_file"],
        max_new_tokens=options["max_new_tokens"],
        batch_sizes=_ints(options["batch_sizes"], "--batch-sizes") or [1],
        runs=options["runs"],
        warmup=options["warmup"],
        device=options["device"],
        reference=options["reference"],
        threads=options["threads"],
        baseline=options["baseline"],
    )
    report["gate"] = gate
    return report
