"""One way to reach Ray: a local instance bound to 127.0.0.1, or a cluster the user names.

A local instance listens on loopback only: Ray would otherwise resolve 127.0.0.1 to the machine's
interface address and expose its servers there. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's own
single-machine switch (it is read when ``ray`` is imported, hence set before the import).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RayOptions:
    """How a stage runs, the options every parallel command shares: ``workers`` Ray tasks in parallel (1 and no
    ``address``: in this process, without Ray), the cluster at ``address`` (None: a loopback-only local
    instance started on demand), whether an existing output may be replaced, and a progress bar."""

    workers: int = 1
    address: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")

    @property
    def cluster(self) -> str | None:
        """The cluster to use: ``address``, else the one a Ray job runs in."""
        return self.address or job_cluster()

    @property
    def uses_ray(self) -> bool:
        return self.workers > 1 or self.cluster is not None


def job_cluster() -> str | None:
    """Inside a Ray job (``ctsynth submit``), the job's cluster: Ray sets ``RAY_ADDRESS`` for the job's command and
    marks it with its job config. Elsewhere None: a ``RAY_ADDRESS`` in a user's shell (often the dashboard's URL,
    for Ray's own job CLI) does not send ctsynth's local work to a cluster."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return None


#: Environment for processes that log to MLflow (the driver, and Ray workers through their runtime env).
MLFLOW_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def set_local_defaults() -> None:
    """Loopback-only Ray, no telemetry and a quiet terminal, unless the environment already says otherwise
    (multi-node clusters: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``). Read when ray / mlflow are imported."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for name, value in MLFLOW_ENV.items():  # no MLflow telemetry, no "Creating initial database tables"
        os.environ.setdefault(name, value)
    # Ray Train's print patch tees every worker print to stdout and to its logger: each line showed twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Tune's own banner, result paths and TensorBoard hint: ctsynth prints a line per trial instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A harmless C++ warning Ray Train's controller prints at every start (its preemption watcher's arguments).
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "PreemptionWatcher")


def quiet_train_env(verbose: bool) -> dict[str, str]:
    """Environment for Ray Train workers (which may run on other nodes than the driver)."""
    return {**MLFLOW_ENV, **({} if verbose else {"CTSYNTH_QUIET_TRAIN": "1"})}


def quiet_worker_logs() -> None:
    """On a Ray Train worker: hide Ray's per-report and checkpoint lines unless the run is verbose. Ray names
    that logger after its module's file, so Train's ``LoggingConfig`` does not reach it."""
    import logging

    if os.environ.get("CTSYNTH_QUIET_TRAIN") != "1":
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray than the one this was written for: its lines stay, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None,
               verbose: bool = False) -> None:  # fmt: skip
    """Connect to Ray once per process: ``address`` when given (or, inside a Ray job, the job's cluster), else
    start a loopback-only local instance.

    An instance this process already joined is reused (tests share one). The loopback defaults were set
    when ``ctsynth_ray.pipelines`` was imported. Ray's start-up messages show only when ``verbose``.
    """
    import logging

    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    address = address or job_cluster()
    if address:
        ray.init(address=address, logging_level=level)
        return
    if not verbose:  # Ray turns token authentication on for a local instance and says so at every start
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        num_cpus=num_cpus,
        _node_ip_address=LOOPBACK,
        dashboard_host=LOOPBACK,
        _temp_dir=temp_dir,
        logging_level=level,
    )


def parallel_map(
    fn: Callable[..., Any],
    argument_tuples: Sequence[tuple],
    ray_options: RayOptions = RayOptions(),
    *,
    description: str = "",
    unit: str = "vol",
    memory: Sequence[int] | None = None,
    on_failure: Callable[[int, BaseException], Any] | None = None,
) -> list[Any]:
    """``[fn(*args) for args in argument_tuples]``, in order, as Ray tasks when ``ray_options.uses_ray`` (at most
    ``workers`` in flight on a local instance), in-process otherwise.

    ``memory``: bytes each call needs at its peak, declared to Ray (its ``memory`` resource), so that a node runs
    only as many at once as fit. ``on_failure(k, error)``: the result of call k when its Ray task failed for another
    reason than a user error (its worker died, out of memory, after Ray's retries), instead of raising; a run over
    a thousand cases goes on without the one that could not be done.

    Results never depend on ``workers``: each call gets only its own arguments.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(argument_tuples), desc=description, unit=unit, disable=not ray_options.progress, leave=True)
    try:
        if not ray_options.uses_ray:
            results = []
            for args in argument_tuples:
                results.append(fn(*args))
                bar.update()
            return results
        address = ray_options.cluster
        ensure_ray(address, num_cpus=None if address else ray_options.workers)
        import ray

        remote = ray.remote(num_cpus=1)(fn)
        if memory is not None:  # more than any node has would wait forever: such a task runs alone on the largest
            largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
            memory = [min(int(m), int(largest)) if largest else int(m) for m in memory]
        limit = len(argument_tuples) if address else ray_options.workers
        pending: dict = {}
        results: list[Any] = [None] * len(argument_tuples)
        queue = list(enumerate(argument_tuples))
        while queue or pending:
            while queue and len(pending) < limit:
                k, args = queue.pop(0)
                options = {"memory": int(memory[k])} if memory is not None else {}
                pending[remote.options(**options).remote(*args)] = k
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                k = pending.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    from ctsynth_ray.errors import CtsynthError

                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, CtsynthError):  # a user error in a task: its one line, no traceback
                        raise CtsynthError(str(cause)) from None
                    if on_failure is None:
                        raise
                    results[k] = on_failure(k, exc)
                bar.update()
        return results
    finally:
        bar.close()
