"""`ctsynth submit` and `ctsynth jobs` against a real two-node Ray cluster on this machine (127.0.0.2 and 127.0.0.3,
one CPU each, token authentication on), through the CLI in subprocesses, as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctsynth_ray.dataset import read_manifest
from ctsynth_ray.pipelines.loopback_cluster import LoopbackCluster

CTSYNTH = str(Path(sys.executable).parent / "ctsynth")


@pytest.fixture(scope="module")
def cluster():
    with LoopbackCluster(node_cpus=(1, 1)) as running:
        yield running
    assert not running.processes(), "the cluster's processes outlived it"


def ctsynth(cluster, *args, token: str | None = "cluster", timeout: int = 300):
    env = cluster.env(with_token=token is not None)
    if token not in (None, "cluster"):
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([CTSYNTH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def task_nodes(cluster, name: str) -> set[str]:
    """Node ids of the finished tasks (and actor calls) called ``name``, from Ray's state API."""
    code = (
        "import json, sys; from ray.util.state import list_tasks; "
        "tasks = list_tasks(address=sys.argv[1], filters=[('func_or_class_name', '=', sys.argv[2])], limit=1000, "
        "raise_on_missing_output=False); "
        "print(json.dumps(sorted({t.node_id for t in tasks if t.state == 'FINISHED'})))"
    )
    done = subprocess.run([sys.executable, "-c", code, cluster.dashboard, name], env=cluster.env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_submit_generate_runs_on_both_nodes_and_writes_each_volume_once(cluster, tiny_generator, tmp_path):
    out = tmp_path / "synth"
    done = ctsynth(cluster, "submit", "--address", cluster.dashboard, "--submission-id", "gen-4", "--",
                   "generate", "--n", "4", "--chunk", "1", "--model", str(tiny_generator), "--out", f"file://{out}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "job gen-4 SUCCEEDED" in done.stderr
    assert "4 volume(s) in" in done.stdout  # the job's own log, followed to the end
    rows = read_manifest(out)
    assert sorted(r["synth_index"] for r in rows) == [0, 1, 2, 3]
    for sub in ("images", "masks", "labels"):
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == sorted(f"{r['volume_id']}.nii.gz" for r in rows), sub  # once each, no temporary files
    assert len(task_nodes(cluster, "VolumeMaker.make")) == 2  # generator actors on both nodes made volumes
    listed = ctsynth(cluster, "jobs", "list", "--address", cluster.dashboard)
    assert listed.returncode == 0 and any(line.startswith("gen-4") and "SUCCEEDED" in line
                                          for line in listed.stdout.splitlines())  # fmt: skip
    logs = ctsynth(cluster, "jobs", "logs", "gen-4", "--address", cluster.dashboard)
    assert logs.returncode == 0 and "4 volume(s) in" in logs.stdout


def test_a_failing_command_fails_the_job_and_the_submit(cluster, tmp_path):
    missing = tmp_path / "nothing-here"
    done = ctsynth(cluster, "submit", "--address", cluster.dashboard, "--", "inspect", str(missing))
    assert done.returncode == 1
    assert f"{missing}/manifest.parquet: no manifest" in done.stdout  # the command's own line, from the cluster
    assert " FAILED: " in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("token", "says"), [(None, "no token was sent"), ("0" * 64, "refused the authentication token")]
)
def test_without_the_right_token_submit_says_so_in_one_line(cluster, token, says):
    done = ctsynth(cluster, "submit", "--address", cluster.dashboard, "--", "inspect", "/x", token=token)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("ctsynth: error: http://127.0.0.1:")


def test_the_token_file_in_home_authenticates(cluster, tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(cluster.token)
    env = {**cluster.env(with_token=False), "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    done = subprocess.run([CTSYNTH, "jobs", "list", "--address", cluster.dashboard], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_jobs_stop_and_follow_a_stopped_job(cluster, tmp_path):
    done = ctsynth(cluster, "submit", "--address", cluster.dashboard, "--no-wait", "--submission-id", "slow-1", "--",
                   "phantom", "--n", "40", "--out", str(tmp_path / "ph"))  # fmt: skip
    assert done.returncode == 0 and "ctsynth jobs logs slow-1 --follow" in done.stderr
    stopped = ctsynth(cluster, "jobs", "stop", "slow-1", "--address", cluster.dashboard)
    assert stopped.returncode == 0 and "slow-1" in stopped.stdout
    followed = ctsynth(cluster, "jobs", "logs", "slow-1", "--follow", "--address", cluster.dashboard)
    assert followed.returncode == 1 and "job slow-1 STOPPED" in followed.stderr
    assert not (tmp_path / "ph" / "manifest.parquet").exists()  # a stopped run leaves no dataset
    unknown = ctsynth(cluster, "jobs", "stop", "no-such-job", "--address", cluster.dashboard)
    assert unknown.returncode == 1 and "no-such-job" in unknown.stderr and "Traceback" not in unknown.stderr


def test_submit_refuses_nothing_to_run_and_an_unreachable_cluster(cluster):
    nothing = ctsynth(cluster, "submit", "--address", cluster.dashboard, "--", "jobs", "list")
    assert nothing.returncode == 1 and "runs where you are" in nothing.stderr
    nobody = ctsynth(cluster, "jobs", "list", "--address", "http://127.0.0.1:9")
    assert nobody.returncode == 1 and "no Ray dashboard answers there" in nobody.stderr


def test_submit_refuses_credentials_in_a_uri_before_contacting_anything():
    from ctsynth_ray.errors import CtsynthError
    from ctsynth_ray.pipelines.jobs import SubmitOptions, submit

    with pytest.raises(CtsynthError, match=r"s3://\*\*\*@b/x: a credential in a URI"):
        submit(SubmitOptions(command=("generate", "--out", "s3://KEY:SECRET@b/x"), address="http://127.0.0.1:9"))


def test_relative_paths_in_a_submitted_command_are_named():
    from ctsynth_ray.pipelines.jobs import _relative_paths

    command = ["generate", "--n", "4", "--model", "gan", "--out", "file:///x", "--source=ds", "--bank", "/abs/b"]
    assert _relative_paths(command) == ["gan", "ds"]


def test_ray_address_outside_a_job_does_not_send_local_work_to_a_cluster(monkeypatch):
    from ctsynth_ray.pipelines.runtime import RayOptions

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not RayOptions().uses_ray
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's command
    assert RayOptions().cluster == "127.0.0.2:6379" and RayOptions().uses_ray
