"""`ctsynth sweep`: synthetic/real set-ups x seeds as Ray Tune trials of `train-seg`, compared in MLflow.

Each (set-up, seed) is one Tune trial. The trial is a function trainable that runs `train-seg`'s own
``TorchTrainer`` (Ray Train V2, the pattern of Ray's hyperparameter-optimisation guide): the same training loop,
checkpoints and MLflow logging as ``ctsynth train-seg``, with the trial's run name, its run folder
``SWEEP/trials/<set-up>-seed<k>`` and Tune's report callback. The trial itself holds 0.01 CPU; its Train
worker holds one GPU when the cluster has GPUs, else ``CPUs / concurrency`` CPUs (fractions on small machines).
So a trial that needs several workers is no special case, and an interrupted trial restarts from its latest
checkpoint (Ray Train continues a run folder that holds one).

MLflow: the sweep is a parent run (``SWEEP/mlflow_run.json``), each trial a child run (``mlflow.parentRunId``)
whose id is kept in its run folder, so a resumed sweep adds no run. When the trials are done the sweep compares
every set-up with ``real-only`` of the same seed (paired t-test and Wilcoxon) and logs p-values and mean
differences on the child runs, the table (``comparisons.json``) and the report on the parent.

Sweep folder::

    SWEEP/sweep.json                  options and plan (set-ups, trials); --resume refuses a different plan
    SWEEP/trials/<set-up>-seed<k>/    each trial's train-seg run folder (model, metrics.csv, evals/, ray/)
    SWEEP/tune/                       Ray Tune's experiment state (Tuner.restore)
    SWEEP/report/                     the report (ctsynth_ray.sweep_report)
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ctsynth_ray.dataset import read_manifest, read_prepare_record, write_json
from ctsynth_ray.errors import CtsynthError, CtsynthWarning
from ctsynth_ray.pipelines.tracking import absolute_uri, default_tracking_uri
from ctsynth_ray.pipelines.train_seg import RAY_RUN_NAME, TrainSegOptions
from ctsynth_ray.pipelines.training import RUN_FILE, tracked_run
from ctsynth_ray.segmentation import (
    absolute_spec,
    check_no_leakage,
    gan_overlap_warnings,
    parse_spec,
    select_volumes,
)
from ctsynth_ray.sweep import (
    BASELINE,
    DEFAULT_FRACTIONS,
    PRESETS,
    SetUp,
    ratio_setups,
    real_size_setups,
    thesis_setups,
)

PLAN_FILE = "sweep.json"
TUNE_NAME = "tune"
# What a --resume may change: nothing. Tune restores its own configuration (concurrency included), and the
# trials' MLflow runs live in the first run's store.
COMPARISON_PREFIX = "vs_baseline"
TRIAL_CPU = 0.01


@dataclass(frozen=True)
class SweepOptions:
    real: str
    synthetic: str
    val: str
    out: str
    preset: str = "thesis"
    total: int | None = None
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    real_sizes: tuple[int, ...] = ()
    seeds: int = 3
    iterations: int = 1000
    max_concurrent: int | None = None
    tracking_uri: str = ""
    experiment: str = "ctsynth-sweep"
    # The U-Net of every trial (train-seg's options).
    patch: int = 96
    batch: int = 2
    features: tuple[int, ...] = (32, 64, 128, 256)
    lr: float = 3e-4
    samples_per_volume: int = 8
    eval_every: int | None = None  # default: once, at the end
    workers_per_trial: int = 1

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if min(self.seeds, self.iterations, self.workers_per_trial) < 1:
            raise ValueError("seeds, iterations and workers per trial must be at least 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {self.max_concurrent}")


@dataclass
class Trial:
    setup: SetUp
    seed: int
    train: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.setup.name}-seed{self.seed}"


@dataclass
class SweepSummary:
    out: Path
    trials: int
    finished: int
    failed: list[str]
    parent_run_id: str
    experiment_id: str
    report: dict[str, Path]
    seconds: float
    tune_seconds: float  # Tuner.fit alone: the trials, without planning, comparisons and the report

    def format(self) -> str:
        lines = [f"sweep: {self.finished} of {self.trials} trial(s) finished in {self.seconds:.0f} s"]
        lines += [f"  failed: {line}" for line in self.failed]
        lines += [f"  report: {self.report['report']} (and {self.report['html'].name})"] if self.report else []
        lines += [f"  MLflow: experiment {self.experiment_id}, parent run {self.parent_run_id}"]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ planning


def _real_split(real: str, val_dataset: Path, val_split: str | None) -> tuple[Path, str | None, str | None]:
    """(dataset, split of the real training volumes, a split the GAN never trained on for the mixed set-up)."""
    spec = parse_spec(real)
    if spec.n is not None:
        raise CtsynthError(f"--real {real}: give the dataset (and split), not n=: the set-ups choose the sizes")
    splits = {r["split"] for r in read_manifest(spec.dataset) if r.get("image")}
    same = spec.dataset.resolve() == val_dataset.resolve()
    record = read_prepare_record(spec.dataset) or {}
    gan_split = record.get("gan_train_split", "train")
    split = spec.split or ("train" if "train" in splits else None)
    taken = {split, gan_split, *([val_split] if same else [])}
    unseen = next((s for s in ("test", "val", "train") if s in splits and s not in taken), None)
    return spec.dataset, split, unseen


def plan_sweep(options: SweepOptions) -> tuple[list[SetUp], list[Trial], list[str]]:
    """The set-ups, the trials (set-up x seed, with their --train specs) and warnings. Every trial's training
    set is checked against the validation set before anything runs (CtsynthError naming the leak)."""
    val = parse_spec(options.val)
    val_rows = [row for _, row in select_volumes([val], 0)]
    dataset, split, unseen = _real_split(options.real, val.dataset, val.split)
    real_rows = [r for r in read_manifest(dataset) if r.get("image") and (split is None or r["split"] == split)]
    synthetic_rows = [r for r in read_manifest(options.synthetic) if r.get("image")]
    messages: list[str] = []
    if options.preset == "thesis":
        unseen_n = sum(1 for r in read_manifest(dataset) if r.get("image") and r["split"] == unseen)
        setups = thesis_setups(len(real_rows), unseen_n, len(synthetic_rows), options.total, split, unseen)
        if not any(s.name == "mixed" for s in setups):
            messages.append(f"{dataset}: no split the GAN never trained on (besides --val's) holds volumes: the "
                            f"thesis' mixed set-up is left out")  # fmt: skip
    else:
        for rows, what in ((real_rows, f"{dataset} ({split or 'any split'})"), (synthetic_rows, options.synthetic)):
            if not rows:
                raise CtsynthError(f"{what}: no volume with an image to sweep over")
        total = options.total or min(len(real_rows), len(synthetic_rows))
        setups = ratio_setups(total, options.fractions, len(real_rows), len(synthetic_rows), split)
    setups += real_size_setups(options.real_sizes, len(real_rows), split, setups)
    real, synthetic = str(dataset.resolve()), str(Path(options.synthetic).resolve())
    trials = []
    for seed in range(options.seeds):
        for setup in setups:
            train = setup.train_specs(real, synthetic)
            volumes = select_volumes([parse_spec(s) for s in train], seed)
            try:
                check_no_leakage(volumes, val_rows)
            except CtsynthError as exc:
                raise CtsynthError(f"set-up {setup.name}: {exc}") from None
            messages += [m for m in gan_overlap_warnings(volumes) if m not in messages]
            trials.append(Trial(setup, seed, train))
    return setups, trials, messages


def _trial_options(options: SweepOptions, trial: Trial, out: Path, tracking_uri: str) -> dict:
    seg = TrainSegOptions(
        train=trial.train, val=absolute_spec(options.val), run_dir=str(out / "trials" / trial.name),
        iterations=options.iterations, patch=options.patch, samples_per_volume=options.samples_per_volume,
        batch=options.batch, features=tuple(options.features), lr=options.lr, seed=trial.seed,
        eval_every=options.eval_every or options.iterations, workers=options.workers_per_trial,
        tracking_uri=tracking_uri, experiment=options.experiment,
    )  # fmt: skip
    return asdict(seg)


# ------------------------------------------------------------------------------------------------------- trials


def _trial_params(trial: dict) -> dict:
    setup = trial["setup"]
    return {"setup": setup["name"], "real_n": setup["real_n"], "synthetic_n": setup["synthetic_n"],
            "fraction": round(setup["fraction"], 6), "seed": trial["seed"], "iterations": trial["options"]["iterations"]}  # fmt: skip


def _finished(run_dir: Path, iterations: int) -> bool:
    """Whether a trial's run folder holds its finished model and scores."""
    try:
        info = json.loads((run_dir / "model.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("iterations") == iterations
        and (run_dir / "metrics.csv").is_file()
        and (run_dir / "model.pt").is_file()
    )


def _run_trial(config: dict) -> None:
    """A Tune trial: train-seg's TorchTrainer for one (set-up, seed), logging into the trial's child run."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray.tune.integration.ray_train import TuneReportCallback

    from ctsynth_ray.pipelines.train_seg import _train_loop
    from ctsynth_ray.pipelines.training import fit

    trial = config["trial"]
    options = TrainSegOptions(**trial["options"])
    run_dir = Path(options.run_dir)
    if _finished(run_dir, options.iterations):
        # A sweep interrupted after this trial ended, before Tune recorded it: report its scores, train nothing.
        from ray import tune

        from ctsynth_ray.pipelines.train_seg import validation_summary
        from ctsynth_ray.seg_metrics import read_scores_csv

        rows = list(read_scores_csv(run_dir / "metrics.csv").values())
        tune.report({**validation_summary(rows), "step": options.iterations})
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = (run_dir / RUN_FILE).is_file()
    tags = {"mlflow.parentRunId": config["parent_run_id"], "ctsynth.sweep": config["sweep"],
            "ctsynth.trial": trial["name"]}  # fmt: skip
    with tracked_run(run_dir, options.tracking_uri, options.experiment, resumed, run_name=trial["name"],
                     tags=tags) as run_id:  # fmt: skip
        client = MlflowClient(options.tracking_uri)
        logged = client.get_run(run_id).data.params
        missing = {k: v for k, v in _trial_params(trial).items() if k not in logged}
        if missing:  # a fresh run, or one whose process died before they were logged
            client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in missing.items()])
        fit(_train_loop, {"options": asdict(options), "mlflow_run_id": run_id}, run_dir, RAY_RUN_NAME,
            workers=options.workers, cpus_per_worker=config["cpus"], gpus_per_worker=config["gpus"],
            callbacks=[TuneReportCallback()], verbose=config["verbose"])  # fmt: skip


def _trial_resources(trials: int, max_concurrent: int | None, workers: int) -> tuple[int, float, float]:
    """(concurrency, CPUs and GPUs per Train worker) from the cluster: a GPU per worker when there are GPUs, else
    the CPUs shared out, in fractions when more workers than CPUs run at once. Each trial's own actor holds
    ``TRIAL_CPU`` (Tune refuses an empty request); it only waits on its TorchTrainer."""
    import ray

    cluster = ray.cluster_resources()
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    units = gpus if gpus else cpus
    concurrency = min(max_concurrent or max(1, int(units // workers)), trials)
    per_worker_gpus = min(1.0, gpus / (concurrency * workers)) if gpus else 0.0
    per_worker = (cpus - concurrency * TRIAL_CPU) / (concurrency * workers)
    per_worker = math.floor(per_worker) if per_worker >= 1 else math.floor(per_worker * 1000) / 1000
    if per_worker <= 0:
        raise CtsynthError(f"{concurrency} trial(s) of {workers} worker(s) do not fit the cluster's {cpus:g} CPU(s): "
                           f"pass a smaller --max-concurrent")  # fmt: skip
    return concurrency, per_worker, per_worker_gpus


def _progress(echo: Callable[[str], None], total: int):
    """A Tune callback that prints a line per finished or failed trial."""
    from ray import tune

    class Progress(tune.Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            metrics = trial.last_result or {}
            shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("val_dice", "val_sensitivity") if k in metrics)
            echo(f"sweep: [{self.done}/{total}] {trial.config['trial']['name']} finished ({shown})")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            echo(f"sweep: [{self.done}/{total}] {trial.config['trial']['name']} FAILED (the sweep goes on)")

    return Progress()


# ------------------------------------------------------------------------------------------------- comparisons


def _finished_trials(out: Path, plan: dict) -> list:
    from ctsynth_ray.seg_metrics import read_scores_csv
    from ctsynth_ray.sweep_report import TrialScores

    found = []
    for trial in plan["trials"]:
        run_dir = out / "trials" / trial["name"]
        if _finished(run_dir, trial["options"]["iterations"]):
            setup = trial["setup"]
            found.append(TrialScores(setup["name"], trial["seed"], setup["real_n"], setup["synthetic_n"],
                                     read_scores_csv(run_dir / "metrics.csv")))  # fmt: skip
    return found


def _log_comparisons(client, out: Path, parent_run_id: str, rows: list[dict]) -> None:
    """Per-seed comparisons on each child run (p-values and mean differences against the baseline), the whole
    table on the parent."""
    import mlflow

    for row in rows:
        if row["seed"] == "pooled":
            continue
        run_file = out / "trials" / f"{row['setup']}-seed{row['seed']}" / RUN_FILE
        run_id = json.loads(run_file.read_text())["run_id"]
        values = {f"{COMPARISON_PREFIX}_p_{row['metric']}": row["p_value"],
                  f"{COMPARISON_PREFIX}_wilcoxon_p_{row['metric']}": row["wilcoxon_p"],
                  f"{COMPARISON_PREFIX}_diff_{row['metric']}": row["mean_difference"]}  # fmt: skip
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in values.items()
                                          if not math.isnan(v)])  # fmt: skip
    path = out / "comparisons.json"  # written whole each time: a resumed sweep replaces it, never appends
    write_json(path, {"columns": list(rows[0]) if rows else [], "rows": rows})
    client.log_artifact(parent_run_id, str(path))


# ---------------------------------------------------------------------------------------------------------- run


def _last_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1][:300] if lines else type(error).__name__


def _check_out(out: Path, record: dict, resume: bool) -> None:
    path = out / PLAN_FILE
    if not resume:
        if path.exists():
            raise CtsynthError(f"{out}: holds an earlier sweep (pass --resume to continue it, or choose another --out)")
        return
    if not path.is_file():
        raise CtsynthError(f"{out}: no sweep to resume ({PLAN_FILE} not found)")
    try:
        before = json.loads(path.read_text())
        if not isinstance(before.get("options"), dict) or not isinstance(before.get("trials"), list):
            raise ValueError("no options or trials")
    except (ValueError, AttributeError):
        raise CtsynthError(f"{path}: not a sweep plan ctsynth can read; start a new sweep in another --out") from None
    changed = sorted(k for k in record["options"].keys() | before["options"].keys()
                     if before["options"].get(k) != record["options"].get(k))  # fmt: skip
    if changed or before["trials"] != record["trials"]:
        raise CtsynthError(f"{out}: --resume continues the same sweep with the same options, but "
                           f"{', '.join(changed) or 'its plan'} differ(s) from it")  # fmt: skip


def run_sweep(options: SweepOptions, *, resume: bool = False, address: str | None = None, verbose: bool = False,
              echo: Callable[[str], None] = print) -> SweepSummary:  # fmt: skip
    """Plan, check, run the trials on Ray Tune, compare, log and report. CtsynthError before Ray starts for a
    plan that cannot run (too few volumes, leakage, a changed plan on --resume)."""
    import time

    started = time.monotonic()
    setups, trials, messages = plan_sweep(options)
    for message in messages:
        warnings.warn(message, CtsynthWarning, stacklevel=2)
    out = Path(options.out).resolve()
    tracking_uri = absolute_uri(options.tracking_uri or default_tracking_uri())
    plan_options = json.loads(json.dumps({**asdict(options), "out": str(out), "tracking_uri": tracking_uri}))
    trial_dicts = [{"name": t.name, "seed": t.seed, "train": list(t.train), "setup": t.setup.as_dict(),
                    "options": _trial_options(options, t, out, tracking_uri)} for t in trials]  # fmt: skip
    record = json.loads(json.dumps({"options": plan_options, "trials": trial_dicts}))
    _check_out(out, record, resume)
    echo(f"sweep: preset {options.preset}, {len(setups)} set-up(s) x {options.seeds} seed(s) = {len(trials)} trial(s): "
         + "; ".join(f"{s.name} ({s.real_n} real + {s.synthetic_n} synthetic)" for s in setups))  # fmt: skip

    from ctsynth_ray.pipelines.runtime import ensure_ray

    ensure_ray(address, verbose=verbose)
    from mlflow.tracking import MlflowClient
    from ray import tune

    concurrency, cpus, gpus = _trial_resources(len(trials), options.max_concurrent, options.workers_per_trial)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN_FILE, record)  # only once the sweep can start: a sweep that never ran needs no --resume
    echo(f"sweep: {concurrency} trial(s) at a time, each with {cpus:g} CPU(s)" + (f" and {gpus:g} GPU" if gpus else ""))
    with tracked_run(out, tracking_uri, options.experiment, resume and (out / RUN_FILE).is_file(),
                     tags={"ctsynth.kind": "sweep"}) as parent_run_id:  # fmt: skip
        client = MlflowClient(tracking_uri)
        parent = client.get_run(parent_run_id)
        experiment_id = parent.info.experiment_id
        if not parent.data.params:
            import mlflow

            params = {"preset": options.preset, "real": options.real, "synthetic": options.synthetic,
                      "val": options.val, "seeds": options.seeds, "iterations": options.iterations,
                      "trials": len(trials), "setups": ", ".join(s.name for s in setups)}  # fmt: skip
            client.log_batch(parent_run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        trainable = tune.with_resources(_run_trial, {"CPU": TRIAL_CPU})  # its Train workers hold the rest
        param_space = {"trial": tune.grid_search(trial_dicts), "parent_run_id": parent_run_id, "sweep": str(out),
                       "cpus": cpus, "gpus": gpus, "verbose": verbose}  # fmt: skip
        path = out / TUNE_NAME
        callbacks = [_progress(echo, len(trials))]
        if resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True, param_space=param_space)
            local = getattr(tuner, "_local_tuner", None)  # restore brings back the first run's (pickled) callbacks
            if local is not None:
                local.get_run_config().callbacks = callbacks
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=concurrency,
                    trial_name_creator=lambda t: t.config["trial"]["name"],
                    trial_dirname_creator=lambda t: t.config["trial"]["name"],
                ),
                run_config=tune.RunConfig(
                    name=TUNE_NAME, storage_path=str(out), verbose=1 if verbose else 0, callbacks=callbacks
                ),
            )
        tune_started = time.monotonic()
        grid = tuner.fit()
        tune_seconds = time.monotonic() - tune_started
        failed = [f"{r.config['trial']['name']}: {_last_line(r.error)}" for r in grid if r.error is not None]
        finished = _finished_trials(out, record)
        report = {}
        if any(t.setup == BASELINE for t in finished):
            from ctsynth_ray.sweep_report import comparisons, write_report

            _log_comparisons(client, out, parent_run_id, comparisons(finished))
            report = write_report(finished, out / "report", f"Sweep {out.name}", f"sweep folder {out}")
            client.log_artifacts(parent_run_id, str(out / "report"), artifact_path="report")
        elif finished:
            echo(f"sweep: no {BASELINE} trial finished: no comparison and no report")
    return SweepSummary(out, len(trials), len(finished), failed, parent_run_id, experiment_id, report,
                        time.monotonic() - started, tune_seconds)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ reports


def report_from_folder(sweep: str | os.PathLike, out: str | os.PathLike) -> dict[str, Path]:
    """The report of a sweep folder's finished trials, written into ``out``."""
    from ctsynth_ray.sweep_report import write_report

    sweep = Path(sweep).resolve()
    path = sweep / PLAN_FILE
    if not path.is_file():
        raise CtsynthError(f"{sweep}: not a sweep folder ({PLAN_FILE} not found)")
    try:
        plan = json.loads(path.read_text())
    except ValueError as exc:
        raise CtsynthError(f"{path}: not readable JSON ({exc})") from None
    return write_report(_finished_trials(sweep, plan), out, f"Sweep {sweep.name}", f"sweep folder {sweep}")


def report_from_mlflow(experiment: str, out: str | os.PathLike, tracking_uri: str = "") -> dict[str, Path]:
    """The report of the newest sweep logged in MLflow ``experiment``, from MLflow alone: the parent run's child
    runs, their parameters and their per-volume CSV artifacts."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ctsynth_ray.seg_metrics import read_scores_csv
    from ctsynth_ray.sweep_report import TrialScores, write_report

    uri = absolute_uri(tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise CtsynthError(f"{uri}: no MLflow store there")
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CtsynthError(f"{uri}: no MLflow experiment named {experiment!r}")
    parents = client.search_runs([found.experiment_id], "tags.`ctsynth.kind` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if not parents:
        raise CtsynthError(f"experiment {experiment!r}: no sweep run in it")
    parent = parents[0]
    children = client.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=10000)  # fmt: skip
    trials = []
    with tempfile.TemporaryDirectory() as folder:
        for child in children:
            params = child.data.params
            if not {"setup", "seed", "real_n", "synthetic_n"} <= params.keys():
                continue  # a trial whose run was created but never got going: no scores either
            try:
                local = client.download_artifacts(child.info.run_id, "metrics.csv", folder)
            except (MlflowException, OSError):  # a trial that failed or is still running has no scores yet
                continue
            trials.append(TrialScores(params["setup"], int(params["seed"]), int(params["real_n"]),
                                      int(params["synthetic_n"]), read_scores_csv(local)))  # fmt: skip
            os.unlink(local)
    name = parent.data.tags.get("mlflow.runName", parent.info.run_id)
    return write_report(trials, out, f"Sweep {name}", f"MLflow experiment {experiment!r}, run {parent.info.run_id}")
