"""``trtpipe serve ENGINE_DIR... [--gpus 0,1 | --devices cpu:N]``: KServe v2 HTTP + gRPC."""

from __future__ import annotations

import click


@click.command("serve")
@click.argument("engine_dirs", nargs=-1)
@click.option(
    "--name",
    "named",
    multiple=True,
    metavar="NAME=DIR",
    help="Serve DIR under model name NAME (repeatable); plain ENGINE_DIRs use the dir name.",
)
@click.option(
    "--model-control-mode",
    type=click.Choice(["none", "explicit"]),
    default="none",
    show_default=True,
    help="As Triton: none serves every model given; explicit loads/unloads models of the "
    "repository by name at run time (POST /v2/repository/models/NAME/load|unload).",
)
@click.option(
    "--load-model",
    "load_models",
    multiple=True,
    metavar="NAME",
    help="Explicit mode: a model to load at startup (repeatable; * for all).",
)
@click.option(
    "--allow-shared-memory",
    is_flag=True,
    help="Enable the system and CUDA shared memory extensions (clients register POSIX shm "
    "regions or CUDA IPC handles and pass tensors through them; regions are confined to their "
    "registered size).",
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Deploy as a Ray Serve application (Ray's HTTP proxy on --host/--http-port; one "
    "replica per GPU, or --replicas CPU replicas). Needs pip install 'trtpipe[ray]'.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1),
    help="--ray: number of replicas [default: one per GPU of --gpus, else 1].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="0 disables HTTP.",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=8001,
    show_default=True,
    help="0 disables gRPC.",
)
@click.option(
    "--grpc-server",
    type=click.Choice(["auto", "uvicorn", "grpcio"]),
    default="auto",
    show_default=True,
    help="What serves gRPC: uvicorn's HTTP/2 (about a third of grpc.aio's CPU per call; needs "
    "zttp, Python 3.11+) or grpc.aio's own server; auto takes uvicorn where it can.",
)
@click.option("--gpus", help="GPU indices, one runner per GPU, e.g. 0,1.")
@click.option(
    "--devices",
    help="cpu:N for N CPU workers, or cuda:0,cuda:1 (default: a CPU worker per core for "
    "encoders, sharing one session; cpu:1 for generation).",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(1),
    help="Largest batch per launch (default and upper bound: the engine profile maximum).",
)
@click.option("--max-queue-delay-ms", type=click.FloatRange(0), default=2.0, show_default=True)
@click.option(
    "--max-padding-share",
    type=click.FloatRange(0, 1, max_open=True),
    help="Largest share of a launch that may be padding: a launch takes the oldest request and "
    "its nearest neighbours in length within it (default: 0.1 on CPUs, 0.5 on GPUs).",
)
@click.option(
    "--learn-launch-cost/--no-learn-launch-cost",
    default=True,
    show_default=True,
    help="Also stop a launch where the next request's padding would cost more than the launch "
    "overhead it shares, learnt from the device time of recent launches.",
)
@click.option(
    "--max-queue-size",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Queued requests beyond this are rejected at once (HTTP 503, gRPC UNAVAILABLE).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="Per-request timeout in seconds (HTTP 504, gRPC DEADLINE_EXCEEDED).",
)
@click.option(
    "--policy",
    type=click.Choice(["shared_queue", "round_robin", "least_busy"]),
    default="shared_queue",
    show_default=True,
    help="How batches reach devices: one queue that free devices take from (shared_queue), "
    "dealt in turn (round_robin), or to the device with the fewest in flight (least_busy).",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(0, min_open=True),
    default=64.0,
    show_default=True,
    help="Largest request body (HTTP) / message (gRPC).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="On SIGTERM, how long accepted requests may take to finish.",
)
@click.option(
    "--retry/--no-retry",
    default=True,
    show_default=True,
    help="Retry a batch once on another device when its device fails.",
)
@click.option("--access-log/--no-access-log", default=False, show_default=True)
@click.option(
    "--warmup/--no-warmup",
    default=True,
    show_default=True,
    help="Run every length bucket once per device before reporting ready.",
)
@click.option(
    "--cpu-threads",
    type=click.IntRange(1),
    help="Intra-op threads per CPU worker (default: the cores split across the CPU workers).",
)
@click.option(
    "--cpu-spin/--no-cpu-spin",
    default=True,
    show_default=True,
    help="Let idle ONNX Runtime CPU threads busy-wait between ops (faster ops, fewer cycles "
    "left for the front end).",
)
@click.option(
    "--cpu-share-session/--no-cpu-share-session",
    default=True,
    show_default=True,
    help="CPU workers of a model run one ONNX Runtime session between them (its weights held "
    "once) instead of one each.",
)
@click.option(
    "--null-runner",
    is_flag=True,
    help="Measure the front end alone: the engine replaced by a zero-cost runner of the same "
    "signature (outputs are zeros).",
)
def command(
    engine_dirs: tuple[str, ...],
    named: tuple[str, ...],
    host: str,
    http_port: int,
    grpc_port: int,
    grpc_server: str,
    gpus: str | None,
    devices: str | None,
    max_batch_size: int | None,
    max_queue_delay_ms: float,
    max_queue_size: int,
    timeout_s: float,
    policy: str,
    max_body_mb: float,
    drain_timeout: float,
    retry: bool,
    access_log: bool,
    warmup: bool,
    null_runner: bool,
    cpu_threads: int | None = None,
    cpu_spin: bool = True,
    cpu_share_session: bool = True,
    max_padding_share: float | None = None,
    learn_launch_cost: bool = True,
    model_control_mode: str = "none",
    load_models: tuple[str, ...] = (),
    allow_shared_memory: bool = False,
    use_ray: bool = False,
    replicas: int | None = None,
) -> None:
    """Serve ENGINE_DIRs over KServe v2 (Triton-compatible) HTTP and gRPC.

    Each engine is a model named after its directory (or NAME=DIR via --name); a directory of
    engine dirs is a model repository whose engines are all served, by folder name. Batches are
    formed by a dynamic batcher and dealt across the devices; SIGTERM drains and exits 0.
    """

    from trtpipe.cli.logs import show_logger
    from trtpipe.devices import parse_devices, parse_gpus
    from trtpipe.errors import InputError
    from trtpipe.server.app import InferenceServer, ServerConfig
    from trtpipe.server.config import ServeConfig
    from trtpipe.server.repository import ModelRepository

    for spec in named:
        if "=" not in spec:
            raise InputError(f"--name {spec!r}: use NAME=ENGINE_DIR")
    if not http_port and not grpc_port:
        raise InputError("--http-port 0 and --grpc-port 0 leave nothing to serve on")
    if gpus and devices:
        raise InputError("give --gpus or --devices, not both")
    chosen = parse_gpus(gpus) if gpus else parse_devices(devices or "cpu:1")
    # No layout given: an encoder gets a CPU worker per core (ServeConfig.encoder_devices).
    per_core = not gpus and not devices
    config = ServeConfig(
        devices=chosen,
        cpu_worker_per_core=per_core,
        policy=policy,
        retry_on_failure=retry,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        max_queue_size=max_queue_size,
        timeout_s=timeout_s,
        warmup=warmup,
        null_runner=null_runner,
        threads_per_cpu_worker=cpu_threads,
        cpu_spin=cpu_spin,
        share_cpu_session=cpu_share_session,
        max_padding_share=max_padding_share,
        learn_launch_cost=learn_launch_cost,
    )
    if null_runner:
        click.echo("--null-runner: every output is zeros (front-end ceiling only)", err=True)
    if use_ray:
        _serve_on_ray(
            [*engine_dirs, *named], config, replicas, bool(gpus), host, http_port, max_body_mb
        )
        return
    if replicas is not None:
        raise InputError("--replicas applies to --ray only")
    repository = ModelRepository.from_specs(
        [*engine_dirs, *named], config, control_mode=model_control_mode, load=load_models
    )
    if allow_shared_memory:
        from trtpipe.server.shared_memory import SystemSharedMemory

        repository.shared_memory = SystemSharedMemory()
    server = InferenceServer(
        repository,
        ServerConfig(
            host=host,
            http_port=http_port or None,
            grpc_port=grpc_port or None,
            grpc_server=grpc_server,
            max_body_bytes=int(max_body_mb * (1 << 20)),
            drain_timeout_s=drain_timeout,
            access_log=access_log,
        ),
    )
    if access_log:
        show_logger("uvicorn.access")  # one INFO line per request, quiet otherwise
    if repository.names:
        click.echo(
            f"loading {', '.join(repository.names)} on {', '.join(map(str, chosen))} ...",
            err=True,
        )
    unloaded = sorted(set(repository.available) - set(repository.names))
    if unloaded:
        click.echo(
            f"explicit model control: {', '.join(unloaded)} not loaded "
            "(POST /v2/repository/models/NAME/load)",
            err=True,
        )

    def announce(started: InferenceServer) -> None:
        parts = []
        if started.http_port:
            parts.append(f"HTTP http://{host}:{started.http_port}")
        if started.grpc_port:
            kind = "uvicorn HTTP/2" if started.grpc_is_uvicorn else "grpc.aio"
            parts.append(f"gRPC {host}:{started.grpc_port} ({kind})")
        click.echo(f"serving {repository.names} on {', '.join(parts)}", err=True)

    from trtpipe.server.loop import run

    run(server.run(on_started=announce))  # the server logs "server stopped" itself


def _serve_on_ray(
    specs: list[str],
    config: object,
    replicas: int | None,
    on_gpus: bool,
    host: str,
    http_port: int,
    max_body_mb: float,
) -> None:
    """``--ray``: the same server as a Ray Serve application behind Ray's HTTP proxy."""
    import dataclasses

    from trtpipe.deploy.ray import RayOptions, run
    from trtpipe.errors import InputError

    if not http_port:
        raise InputError("--ray serves HTTP through Ray's proxy: give an --http-port")
    assert dataclasses.is_dataclass(config) and not isinstance(config, type)
    settings = dataclasses.asdict(config)
    devices = settings.pop("devices")
    threads = settings.get("threads_per_cpu_worker") or 1
    options = RayOptions(
        engines=specs,
        replicas=replicas or (len(devices) if on_gpus else 1),
        gpus=on_gpus,
        cpus=float(threads),
        serve_options=settings,
        max_body_bytes=int(max_body_mb * (1 << 20)),
    )
    click.echo(
        f"deploying {options.replicas} Ray Serve replica(s) "
        f"({'1 GPU' if on_gpus else f'{threads} CPU(s)'} each); HTTP on {host}:{http_port}, "
        "gRPC is not proxied",
        err=True,
    )
    run(options, host, http_port)
