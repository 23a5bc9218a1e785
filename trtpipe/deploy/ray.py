"""trtpipe's server as a Ray Serve application: one replica per device, Ray's proxy in front.

Each replica runs the same HTTP application as ``trtpipe serve`` (KServe v2 JSON and binary
tensors, the repository and shared memory extensions, OpenAI routes) over its own model
repository on ONE device: the GPU Ray gave it (``num_gpus: 1``, seen as cuda:0) or, on CPU,
``num_cpus`` cores of intra-op threads. Ray's HTTP proxy routes requests to replicas and
autoscaling settings pass through. A replica's health is its device pool's: Ray restarts a
replica whose models have no healthy device.

Use it from the CLI (``trtpipe serve ENGINE... --ray --replicas 2``), with ``serve run
trtpipe.deploy.ray:app engines=/path/to/engines replicas=2``, or in a Serve config file
(``import_path: trtpipe.deploy.ray:app``, ``args: {engines: [...]}``). ``ray[serve]`` is an
optional extra: ``pip install 'trtpipe[ray]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trtpipe.errors import BackendUnavailableError, InputError

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "trtpipe"


def require_ray() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendUnavailableError(
            "--ray needs Ray Serve: pip install 'trtpipe[ray]' (ray[serve])"
        ) from exc
    return serve


@dataclass
class RayOptions:
    """How the application is deployed: replicas, per-replica resources, autoscaling."""

    engines: list[str]
    replicas: int = 1
    gpus: bool = False  # one GPU per replica; else CPU replicas of ``cpus`` cores each
    cpus: float = 1.0
    autoscaling: dict[str, Any] | None = None  # Ray Serve autoscaling_config, passed through
    serve_options: dict[str, Any] = field(default_factory=dict)  # ServeConfig fields
    max_body_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not self.engines:
            raise InputError("give at least one ENGINE_DIR (or a dir of engine dirs) to serve")
        if self.replicas < 1:
            raise InputError("--replicas must be >= 1")
        if self.cpus <= 0:
            raise InputError("CPUs per replica must be > 0")


class TrtpipeReplica:
    """One Ray Serve replica: a model repository on one device behind trtpipe's HTTP app."""

    def __init__(self, options: RayOptions):
        self.options = options
        self.repository: Any = None

    async def __serve_build_asgi_app__(self) -> Any:
        """Load and warm the models (Ray calls this before the replica takes traffic)."""
        from trtpipe.devices import Device
        from trtpipe.server.config import ServeConfig
        from trtpipe.server.fast_path import FastPath
        from trtpipe.server.http import ServerState, create_http_app
        from trtpipe.server.metrics import ServerMetrics
        from trtpipe.server.repository import ModelRepository

        options = self.options
        serve_options = dict(options.serve_options)
        if not options.gpus and not serve_options.get("threads_per_cpu_worker"):
            serve_options["threads_per_cpu_worker"] = max(1, int(options.cpus))
        device = Device("cuda", 0) if options.gpus else Device("cpu", 0)
        config = ServeConfig(devices=[device], **serve_options)
        self.repository = ModelRepository.from_specs(options.engines, config)
        await self.repository.start()
        app = create_http_app(
            self.repository,
            ServerMetrics(self.repository),
            ServerState(started=True),
            options.max_body_bytes,
        )
        log.info("replica serving %s on %s", self.repository.names, device)
        return FastPath(app, self.repository, options.max_body_bytes)

    def check_health(self) -> None:
        """Ray's health check: unhealthy (restarted) when a model has no healthy device."""
        if self.repository is not None and not self.repository.ready:
            raise RuntimeError(f"trtpipe replica not ready: {self.repository.index()}")


def build_application(options: RayOptions) -> Any:
    """The Ray Serve application (``serve.run(build_application(...))``)."""
    serve = require_ray()
    actor: dict[str, Any] = {"num_gpus": 1} if options.gpus else {"num_cpus": options.cpus}
    settings: dict[str, Any] = {"name": DEPLOYMENT_NAME, "ray_actor_options": actor}
    if options.autoscaling:
        settings["autoscaling_config"] = options.autoscaling
    else:
        settings["num_replicas"] = options.replicas
    deployment = serve.deployment(**settings)(serve.ingress()(TrtpipeReplica))
    return deployment.bind(options)


def app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run trtpipe.deploy.ray:app engines=DIR[,DIR] ...`` and
    Serve config files: ``engines`` (list or comma string), ``replicas``, ``gpus``, ``cpus``,
    ``autoscaling_config`` and any ``trtpipe serve`` batching option by its ServeConfig name."""
    args = dict(args)
    engines = args.pop("engines", None)
    if isinstance(engines, str):
        engines = [e for e in engines.split(",") if e]
    if not engines:
        raise InputError("trtpipe.deploy.ray:app needs engines=DIR[,DIR...]")
    options = RayOptions(
        engines=list(engines),
        replicas=int(args.pop("replicas", 1)),
        gpus=str(args.pop("gpus", "false")).lower() in ("1", "true", "yes"),
        cpus=float(args.pop("cpus", 1)),
        autoscaling=args.pop("autoscaling_config", None),
        serve_options=args,
    )
    return build_application(options)


def run(options: RayOptions, host: str, port: int, address: str | None = None) -> None:
    """Start (or join, with ``address`` / RAY_ADDRESS) a Ray cluster, deploy, and block."""
    serve = require_ray()
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(options), name=DEPLOYMENT_NAME, route_prefix="/", blocking=True)


def ray_available() -> bool:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


__all__: Sequence[str] = ["RayOptions", "app", "build_application", "run"]
