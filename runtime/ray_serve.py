"""Scale-out serving on Ray Serve: a router deployment in front of one deployment per expert.

    from ray import serve
    from aptp.runtime.ray_serve import ServeOptions, build_app

    app = build_app("exports/tiny", ServeOptions(replicas=6, num_cpus=1))
    serve.run(app, name="aptp", route_prefix="/")     # on your own Ray cluster
    # POST http://HOST:8000/ {"prompt": "a red car", "seed": 7} -> PNG (aptp.runtime.serve_http)

The router deployment (the HTTP ingress) checks each request with the pipeline's own option
checks, then tokenises and routes the prompts of concurrent requests in one router call
(``@serve.batch``) and hands each request to its expert's deployment. Every expert, and the
dense model, is a deployment wrapping `AptpPipeline` fixed to that UNet, with ``@serve.batch``
forming batches of up to the export's ``max_batch`` within ``max_wait_s``. Routing, sampling
and seeds are the pipeline's, so a request gives the same pixels here as in-process.

Replicas per expert follow the export's prompt shares (`replica_counts`), or autoscale between
one and that count. Every replica needs the export directory at the same path (a shared file
system on a multi-node cluster). Ray is imported only when an app is built, so
``import aptp.runtime`` works without it (``pip install 'aptp[serve]'`` adds it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aptp.errors import AptpError, ConfigError

from .artifacts import DENSE

__all__ = ["ServeOptions", "build_app", "check_placement", "deployment_plan", "replica_counts", "require_ray"]

logger = logging.getLogger(__name__)

ROUTER = "router"


def require_ray() -> Any:
    """`ray.serve`, or a `ConfigError` naming the extra to install."""
    try:
        from ray import serve
    except ImportError as err:
        raise ConfigError(f"Ray Serve is not installed ({err}): pip install 'aptp[serve]'") from None
    return serve


@dataclass(frozen=True)
class ServeOptions:
    """How the app is deployed.

    Args:
        replicas: expert replicas in all (split by prompt share, at least one each), or a
            mapping ``{code or "dense": count}``; None: one per model.
        autoscaling: scale each expert between one replica and its share of `replicas`.
        max_batch: prompts per expert batch (default: the export's ``max_batch``).
        max_wait_s: longest wait for a batch to fill (expert batches and router batches).
        router_max_batch: prompts per router call.
        router_replicas: replicas of the router (ingress) deployment.
        num_cpus, num_gpus: Ray resources per expert replica (``num_gpus > 0`` runs on CUDA).
        router_num_cpus: Ray resources per router replica.
        threads: intra-op threads of each replica's onnxruntime sessions.
        dense: deploy the dense UNet too (requests with ``"expert": "dense"``).
        max_queued_requests: requests an expert deployment queues before refusing (HTTP 503).
        verify: check every export file's sha256 when a replica starts.
    """

    replicas: int | Mapping[Any, int] | None = None
    autoscaling: bool = False
    max_batch: int | None = None
    max_wait_s: float = 0.02
    router_max_batch: int = 16
    router_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    router_num_cpus: float = 0.5
    threads: int | None = 1
    dense: bool = True
    max_queued_requests: int = 64
    verify: bool = True

    def check(self) -> None:
        """Raises `ConfigError` on an out-of-range option."""
        for name in ("router_max_batch", "router_replicas", "max_queued_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise ConfigError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        for name in ("max_wait_s", "num_cpus", "num_gpus", "router_num_cpus"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")


def replica_counts(shares: Sequence[float], total: int) -> list[int]:
    """`total` replicas over experts in proportion to `shares`, at least one each (largest
    remainder for the rest)."""
    k = len(shares)
    if total < k:
        raise ConfigError(f"{total} replicas cannot give each of the {k} experts one; pass at least {k}")
    weights = [max(0.0, float(s)) for s in shares]
    norm = sum(weights) or 1.0
    exact = [(total - k) * w / norm for w in weights]
    counts = [1 + int(x) for x in exact]
    for i in sorted(range(k), key=lambda i: exact[i] - int(exact[i]), reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _model_name(key: int | str) -> str:
    return "dense" if key == DENSE else f"expert-{key}"


def deployment_plan(artifacts: Any, options: ServeOptions) -> dict[int | str, dict[str, Any]]:
    """Per model key: its deployment name, replica count (or autoscaling bounds) and share."""
    keys = [k for k in artifacts.model_keys if options.dense or k != DENSE]
    codes = [k for k in keys if k != DENSE]
    shares = [artifacts.experts[k].share if artifacts.experts[k].share is not None else 1.0 for k in codes]
    replicas = options.replicas
    if replicas is None:
        counts = dict.fromkeys(keys, 1)
    elif isinstance(replicas, Mapping):
        unknown = [k for k in replicas if k not in keys]
        if unknown:
            raise ConfigError(f"replicas for unknown model(s) {unknown}; this export serves {keys}")
        counts = {k: int(replicas.get(k, 1)) for k in keys}
        if any(c < 1 for c in counts.values()):
            raise ConfigError(f"every model needs at least one replica, got {counts}")
    else:
        need = len(keys)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < need:
            raise ConfigError(f"replicas must be at least {need} (one per expert{' plus the dense model' if DENSE in keys else ''}), "
                              f"got {replicas!r}")
        counts = dict(zip(codes, replica_counts(shares, replicas - (DENSE in keys))))
        if DENSE in keys:
            counts[DENSE] = 1
    share_of = dict(zip(codes, shares))
    return {k: {"name": _model_name(k), "replicas": counts[k], "share": share_of.get(k)} for k in keys}


def check_placement(plan: Mapping[Any, Mapping[str, Any]], options: ServeOptions,
                    resources: Mapping[str, float]) -> None:
    """Refuse a deployment the cluster cannot place: Ray Serve would wait for the resources
    forever, without a word (the default plan asks 1 CPU per model and 0.5 for the router, more
    than a 2-core machine has).

    Args:
        plan: `deployment_plan`'s result.
        resources: the cluster's totals, as ``ray.cluster_resources()`` gives them.

    Raises:
        ConfigError: the plan needs more CPUs or GPUs than the cluster has, naming what it needs
            and flags that fit.
    """
    replicas = sum(1 if options.autoscaling else int(entry["replicas"]) for entry in plan.values())
    router = options.router_replicas * options.router_num_cpus
    for unit, per_replica, extra, flag in (("CPU", options.num_cpus, router, "--num-cpus"),
                                           ("GPU", options.num_gpus, 0.0, "--num-gpus")):
        have = float(resources.get(unit, 0.0))
        need = replicas * per_replica + extra
        if need <= have + 1e-9:
            continue
        room = (have - extra) / replicas if replicas else 0.0
        fit = math.floor(room * 100) / 100
        hint = f"pass {flag} {fit:g} or fewer" if fit > 0 else "pass --no-dense or fewer --replicas"
        raise ConfigError(f"the Ray cluster has {have:g} {unit}s but this app needs {need:g} ({replicas} model "
                          f"replica(s) x {flag} {per_replica:g}" + (f" + {extra:g} for the router" if extra else "")
                          + f"): Ray would wait for them forever; {hint}, or serve without --ray (local mode)")


def _status_of(err: BaseException) -> tuple[int, str]:
    """HTTP status and message for a failure behind the router."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    from .http_app import default_status

    cause = getattr(err, "cause", None) or err
    if isinstance(cause, AptpError):
        return default_status(cause)
    if isinstance(err, sex.BackPressureError):
        return 503, "the expert's queue is full; retry later"
    if isinstance(err, (rex.RayActorError, rex.ActorUnavailableError, sex.ReplicaUnavailableError,
                        sex.DeploymentUnavailableError)):
        return 503, "the replica serving this request stopped before it finished; retry (Ray restarts it)"
    return 500, f"{type(cause).__name__}: {cause}"


def _deployments(serve: Any) -> tuple[type, type]:
    """The router and model deployment classes (defined here so Ray loads only when needed)."""
    from starlette.requests import Request
    from starlette.responses import Response

    from .a1111 import result_dict
    from .http_app import Service, dispatch
    from .isolation import run_isolated
    from .pipeline import AptpPipeline, GenerationOptions
    from .serve_http import HttpError, encode_png

    Item = tuple[str, int, GenerationOptions, "str | None"]

    class ModelDeployment:
        """One UNet (an expert or the dense model) behind ``@serve.batch``."""

        def __init__(self, artifacts: str, key: int | str, options: ServeOptions):
            device = "cuda" if options.num_gpus > 0 else "cpu"
            self.pipe = AptpPipeline.from_export(artifacts, verify=options.verify, threads=options.threads,
                                                 device=device, max_batch=options.max_batch)
            self.key = key
            self.pipe.unet(key)  # create the session before traffic arrives
            self._batch.set_max_batch_size(self.pipe.max_batch)
            self._batch.set_batch_wait_timeout_s(options.max_wait_s)

        def pid(self) -> int:
            return os.getpid()

        async def generate(self, request: Item) -> dict[str, Any]:
            """One request's result; a failure of its group is raised to its caller only."""
            result = await self._batch(request)
            if isinstance(result, Exception):
                raise result
            return result

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
        async def _batch(self, requests: list[Item]) -> list[Any]:
            # Requests with other options (guidance, size) cannot share a UNet call: one run each.
            groups: dict[GenerationOptions, list[int]] = {}
            for i, item in enumerate(requests):
                groups.setdefault(dataclasses.replace(item[2], expert=self.key), []).append(i)
            out: list[Any] = [None] * len(requests)
            for opts, rows in groups.items():
                def run(batch: Sequence[int], opts: GenerationOptions = opts) -> list[Any]:
                    negatives = [requests[i][3] for i in batch]
                    return self.pipe.generate([requests[i][0] for i in batch], [requests[i][1] for i in batch], opts,
                                              negative_prompts=negatives if any(negatives) else None)

                # A failing group is re-run one request at a time: a bad request fails only itself.
                results = await asyncio.to_thread(run_isolated, run, rows, f"batch on {_model_name(self.key)}")
                for i, result in zip(rows, results):
                    out[i] = result if isinstance(result, Exception) else {
                        **result_dict(result, encode_png(result.image)), "batch_size": len(rows)}
            return out  # serve.batch hands each item back as a value, exceptions included

    class RouterDeployment:
        """HTTP ingress: the app of `aptp.runtime.http_app`, routing in batches and forwarding
        each image to its expert's deployment."""

        def __init__(self, artifacts: str, options: ServeOptions, models: Mapping[str, Any]):
            # Only the router's sessions are ever created here: the UNets load on first use.
            self.pipe = AptpPipeline.from_export(artifacts, verify=options.verify, threads=options.threads)
            self.models = {(_key(name)): handle for name, handle in models.items()}
            self._route.set_max_batch_size(options.router_max_batch)
            self._route.set_batch_wait_timeout_s(options.max_wait_s)
            # No step callback crosses to the replicas: progress counts finished images here.
            self.service = Service(pipe=self.pipe, generate=self._generate, status_of=_status_of, step_progress=False)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
        async def _route(self, prompts: list[str]) -> list[Any]:
            clock = time.perf_counter()
            codes = await asyncio.to_thread(run_isolated, lambda batch: self.pipe.route(batch).tolist(), prompts,
                                            "routing")
            spent = (time.perf_counter() - clock) / len(prompts)
            return [c if isinstance(c, Exception) else (int(c), spent) for c in codes]

        async def _generate(self, prompt: str, seed: int, opts: GenerationOptions, negative: str | None,
                            callback: Any) -> dict[str, Any]:
            key, route_s = opts.expert, 0.0
            if key is not None and key not in self.models:
                raise HttpError(400, f"expert {key!r} is not deployed here; deployed: {sorted(map(str, self.models))}")
            if key is None:
                routed = await self._route(prompt)
                if isinstance(routed, Exception):
                    raise routed
                key, route_s = routed
            result = await self.models[key].generate.remote((prompt, seed, opts, negative))
            result["timings"]["route"] = route_s
            return result

        async def __call__(self, request: Request) -> Response:
            return await dispatch(request, self.service)

    return RouterDeployment, ModelDeployment


def _key(name: str) -> int | str:
    return DENSE if name == DENSE else int(name)


def build_app(artifacts: str | os.PathLike, options: ServeOptions | None = None) -> Any:
    """A Ray Serve application (``serve.run`` it) serving the export at `artifacts`.

    Raises:
        ConfigError: Ray Serve missing, or bad options.
        ArtifactError: no verified export at `artifacts`.
    """
    from .artifacts import load_artifacts

    serve = require_ray()
    options = options or ServeOptions()
    options.check()
    root = str(Path(artifacts).expanduser().absolute())
    export = load_artifacts(root, verify=options.verify)  # fail here, not in every replica
    plan = deployment_plan(export, options)
    max_batch = options.max_batch or export.max_batch
    router_cls, model_cls = _deployments(serve)
    resources = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}
    handles = {}
    for key, entry in plan.items():
        scaling: dict[str, Any] = {"num_replicas": entry["replicas"]}
        if options.autoscaling:
            scaling = {"autoscaling_config": {"min_replicas": 1, "max_replicas": entry["replicas"],
                                              "target_ongoing_requests": max_batch}}
        model = serve.deployment(model_cls, name=entry["name"], ray_actor_options=resources,
                                 max_ongoing_requests=2 * max_batch,
                                 max_queued_requests=options.max_queued_requests, **scaling)
        handles[str(key)] = model.bind(root, key, options)
    router = serve.deployment(router_cls, name=ROUTER, num_replicas=options.router_replicas,
                              ray_actor_options={"num_cpus": options.router_num_cpus},
                              max_ongoing_requests=options.max_queued_requests * max(1, len(plan)))
    logger.info("aptp Ray Serve app: %s", {entry["name"]: entry["replicas"] for entry in plan.values()})
    return router.bind(root, options, handles)
