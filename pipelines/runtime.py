"""One way to reach Ray: a local instance bound to 127.0.0.1, or a cluster the user names.

A local instance listens on loopback only: Ray would otherwise resolve 127.0.0.1 to the machine's
interface address and expose its servers there. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's own
single-machine switch (it is read when ``ray`` is imported, hence set before the import).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

LOOPBACK = "127.0.0.1"


def set_local_defaults() -> None:
    """Loopback-only Ray and no telemetry, unless the environment already says otherwise (multi-node clusters:
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nor MLflow's (Ray workers inherit this)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Connect to Ray once per process: ``address`` when given, else start a loopback-only local instance.

    An instance this process already joined is reused (tests share one). The loopback defaults were set
    when ``ctsynth_ray.pipelines`` was imported.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    ray.init(
        num_cpus=num_cpus,
        _node_ip_address=LOOPBACK,
        dashboard_host=LOOPBACK,
        _temp_dir=temp_dir,
    )


def parallel_map(
    fn: Callable[..., Any],
    argument_tuples: Sequence[tuple],
    *,
    workers: int = 1,
    address: str | None = None,
    description: str = "",
    progress: bool = True,
    unit: str = "vol",
) -> list[Any]:
    """``[fn(*args) for args in argument_tuples]``, in order, as Ray tasks when ``workers > 1`` or
    ``address`` is given (at most ``workers`` in flight on a local instance), in-process otherwise.

    Results never depend on ``workers``: each call gets only its own arguments.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(argument_tuples), desc=description, unit=unit, disable=not progress, leave=True)
    try:
        if workers <= 1 and address is None:
            results = []
            for args in argument_tuples:
                results.append(fn(*args))
                bar.update()
            return results
        ensure_ray(address, num_cpus=None if address else max(workers, 1))
        import ray

        remote = ray.remote(num_cpus=1)(fn)
        limit = len(argument_tuples) if address else workers
        pending: dict = {}
        results: list[Any] = [None] * len(argument_tuples)
        queue = list(enumerate(argument_tuples))
        while queue or pending:
            while queue and len(pending) < limit:
                k, args = queue.pop(0)
                pending[remote.remote(*args)] = k
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.update()
        return results
    finally:
        bar.close()
