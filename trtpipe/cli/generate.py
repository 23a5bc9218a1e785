"""``trtpipe generate ENGINE_DIR --prompt TEXT | --prompts-file FILE [sampling options]``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("generate")
@click.argument("engine_dir")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for several).")
@click.option(
    "--prompts-file", type=click.Path(path_type=Path), help="Prompts, one a line (blank skipped)."
)
@click.option("--max-new-tokens", type=int, default=50, show_default=True)
@click.option("--greedy", is_flag=True, help="Greedy decoding (argmax); ignores sampling options.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass in (0, 1].")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--ignore-eos", is_flag=True, help="Always generate max-new-tokens tokens.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    help="Prompts per launch (default: engine maximum).",
)
@click.option("--gpus", help="GPU indices, e.g. 0,1 (prompt chunks dealt round-robin).")
@click.option("--devices", help="Devices, e.g. cpu:2 or cuda:0,cuda:1.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads per ONNX Runtime worker.")
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write results and timings."
)
def command(
    engine_dir: str,
    prompts: tuple[str, ...],
    prompts_file: Path | None,
    max_new_tokens: int,
    greedy: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    ignore_eos: bool,
    batch_size: int | None,
    gpus: str | None,
    devices: str | None,
    threads: int | None,
    json_path: Path | None,
) -> None:
    """Generate text with a decoder engine (KV cache on the device between steps)."""
    from trtpipe.cli.paths import check_output_file
    from trtpipe.devices import parse_devices, parse_gpus
    from trtpipe.errors import InputError
    from trtpipe.generation import Generator, SamplingParams
    from trtpipe.jsonfile import write_json
    from trtpipe.text import read_texts

    if bool(prompts) == bool(prompts_file):
        raise InputError("give --prompt TEXT (repeatable) or --prompts-file FILE, not both")
    if gpus and devices:
        raise InputError("give --gpus or --devices, not both")
    texts = list(prompts) if prompts else read_texts(prompts_file)  # type: ignore[arg-type]
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        ignore_eos=ignore_eos,
    ).validate()
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    targets = parse_gpus(gpus) if gpus else parse_devices(devices or "cpu")
    if json_path:
        check_output_file(json_path, "--json")
    with Generator(engine_dir, targets, threads) as generator:
        run = generator.run(texts, params, batch_size)
    for result in run.results:
        click.echo(f"{result.prompt}{result.text}")
        click.echo("---")
    summary = run.summary()
    click.echo(
        f"{summary['generated_tokens']} tokens in {summary['wall_s']:.3f} s: "
        f"{summary['tokens_per_s']:.1f} tokens/s, time to first token p50 "
        f"{summary['ttft_ms_p50']:.1f} ms ({len(targets)} device(s))",
        err=True,
    )
    if json_path:
        payload = {
            "engine": engine_dir,
            "devices": [str(d) for d in targets],
            "params": {
                "max_new_tokens": max_new_tokens,
                "greedy": params.is_greedy,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "seed": seed,
                "batch_size": batch_size,
            },
            "summary": summary,
            "results": [r.to_dict() for r in run.results],
        }
        write_json(json_path, payload)
        click.echo(f"wrote {json_path}", err=True)
