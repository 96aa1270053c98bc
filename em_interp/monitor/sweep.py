"""A sweep of independent jobs: in this process (default) or as Ray tasks on a cluster.

Ray does the scheduling (no home-made job queue here): each job is one task, asking for one GPU
when the cluster has GPUs (Ray then pins it to that GPU through ``CUDA_VISIBLE_DEVICES``) and one
CPU otherwise. Jobs must be top-level functions of picklable arguments whose results they also
write to disk (the perturbation library's runs cache their records), so a sweep that dies resumes
wherever it ran. Ray is an optional extra: ``pip install "em_interp[ray]"``.

``ray`` selects where the jobs run:

- ``None``: in this process, one after another;
- ``"local"``: a fresh local Ray instance (``ray_cpus`` CPUs; the tests use 2);
- ``"auto"``: the running Ray cluster this machine belongs to (``ray start --head`` first);
- ``"HOST:PORT"`` (or ``ray://HOST:PORT``): that cluster's address; it is checked to answer first.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from em_interp.errors import EmInterpError

T = TypeVar("T")
R = TypeVar("R")
#: seconds to wait for a Ray address to accept a connection
CONNECT_TIMEOUT = 5.0


def check_ray_address(address: str) -> None:
    """Raise a clear error unless ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) accepts a TCP connection."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EmInterpError(f"ray={address!r} is not 'local', 'auto' or a HOST:PORT address")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise EmInterpError(f"ray={address!r}: no Ray cluster answers there ({type(exc).__name__}: {exc})") from None


def _init_ray(ray_address: str, ray_cpus: int | None) -> Any:
    try:
        import ray
    except ImportError:
        raise EmInterpError(f"ray={ray_address!r} needs Ray: pip install 'em_interp[ray]'") from None
    if ray.is_initialized():
        return ray
    if ray_address == "local":
        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        return ray
    if ray_address != "auto":
        check_ray_address(ray_address)
    try:
        ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise EmInterpError(f"ray={ray_address!r}: cannot connect to a Ray cluster ({exc})") from None
    return ray


def _call(job: Callable[[T], R], item: T, where: str = "") -> R:
    """One job, its errors naming it (Ray wraps functions only; ``job`` may be a ``functools.partial``).

    An :class:`EmInterpError` keeps its class (a judge outage stays a judge outage) with the job named
    in its message; any other exception keeps its type and traceback and gains a note naming the job.
    """
    try:
        return job(item)
    except EmInterpError as exc:
        exc.args = (f"{where}: {exc.args[0] if exc.args else exc}", *exc.args[1:])
        raise
    except Exception as exc:
        exc.add_note(f"raised in {where}")
        raise


def _job_name(i: int, n: int, item: object) -> str:
    label = getattr(item, "label", None)
    return f"sweep job {i + 1}/{n} ({label if isinstance(label, str) else repr(item)[:120]})"


def run_sweep(job: Callable[[T], R], items: Sequence[T], ray: str | None = None, ray_cpus: int | None = None,
              progress: bool = False) -> list[R]:
    """``[job(item) for item in items]``, in this process or as Ray tasks (results in ``items`` order)."""
    if ray is None:
        out = []
        for i, item in enumerate(items):
            if progress:
                print(f"sweep: job {i + 1}/{len(items)}", flush=True)
            out.append(_call(job, item, _job_name(i, len(items), item)))
        return out
    ray_module = _init_ray(ray, ray_cpus)
    gpus = ray_module.cluster_resources().get("GPU", 0)
    task = ray_module.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=0)(_call)
    refs = [task.remote(job, item, _job_name(i, len(items), item)) for i, item in enumerate(items)]
    return list(ray_module.get(refs))


def shutdown_local_ray(ray: str | None) -> None:
    """Stop the Ray instance a ``ray="local"`` sweep started (clusters given by address are left running)."""
    if ray == "local":
        import ray as ray_module

        if ray_module.is_initialized():
            ray_module.shutdown()
