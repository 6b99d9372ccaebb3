"""deploy/: the KubeRay manifests, the cluster-launcher configs and the Dockerfile parse, name the project's image,
run entrypoints the CLI accepts, and keep the dashboard, Jobs API and secrets out of reach."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from typer.main import get_command

from ctsynth_ray import __version__
from ctsynth_ray.cli.main import app

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
IMAGE = f"ghcr.io/ctsynth/ctsynth:{__version__}"


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def one(name: str) -> dict:
    (document,) = documents(name)
    return document


def cluster_specs() -> list[tuple[str, dict]]:
    specs = [("raycluster", one("kuberay/raycluster.yaml")["spec"])]
    specs += [
        (name, one(f"kuberay/{name}.yaml")["spec"]["rayClusterSpec"]) for name in ("rayjob-generate", "rayjob-sweep")
    ]
    return specs


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def settings() -> dict[str, str]:
    return next(d for d in documents("kuberay/settings.yaml") if d["kind"] == "ConfigMap")["data"]


def parse_with_cli(command_line: str) -> click.Context:
    """The entrypoint as the shell on the head would expand it (settings.yaml's values), parsed by ctsynth's own
    command line: an unknown option or a missing value fails here."""
    expanded = re.sub(r"\$(\w+)", lambda m: settings()[m.group(1)], command_line)
    program, command, *args = shlex.split(expanded)
    assert program == "ctsynth"
    group = get_command(app)
    with group.make_context("ctsynth", [command, "--help"], resilient_parsing=True) as context:
        return group.get_command(context, command).make_context(command, args)


@pytest.mark.parametrize(("name", "spec"), cluster_specs())
def test_every_cluster_runs_the_image_with_token_auth_and_no_public_endpoint(name, spec):
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == "2.60.0"
    assert {c["image"] for c in containers(spec)} == {IMAGE}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in containers(spec):  # the token comes from KubeRay's Secret, never from the manifest
        assert not any(e.get("name") == "RAY_AUTH_TOKEN" and "value" in e for e in container.get("env", []))


@pytest.mark.parametrize(("name", "spec"), cluster_specs())
def test_the_gpu_group_asks_for_gpus_tolerates_their_taint_and_autoscales(name, spec):
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"]


def test_the_generate_job_runs_ctsynth_generate_10000_as_the_cli_parses_it():
    spec = one("kuberay/rayjob-generate.yaml")["spec"]
    assert spec["entrypoint"].startswith("ctsynth generate --n 10000 ")
    context = parse_with_cli(spec["entrypoint"])
    assert context.params["n"] == 10000 and context.params["out"].startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"] == IMAGE


def test_the_sweep_job_runs_a_ratio_sweep_as_the_cli_parses_it():
    spec = one("kuberay/rayjob-sweep.yaml")["spec"]
    context = parse_with_cli(spec["entrypoint"])
    assert context.params["preset"].value == "ratio"
    assert context.params["out_text"].startswith("/mnt/ctsynth/")  # Tune's trials need the shared volume
    assert spec["shutdownAfterJobFinishes"] is True and spec["activeDeadlineSeconds"] > 0


def test_settings_name_the_bucket_and_mlflow_and_hold_no_secret():
    values = settings()
    assert values["CTSYNTH_OUTPUT"].startswith("s3://")
    assert values["MLFLOW_TRACKING_URI"].startswith("http://") and ".svc.cluster.local" in values["MLFLOW_TRACKING_URI"]
    assert not any(re.search(r"(?i)secret|password|token|key", name) for name in values)


def values(node) -> list:
    if isinstance(node, dict):
        return [v for item in node.values() for v in values(item)]
    if isinstance(node, list):
        return [v for item in node for v in values(item)]
    return [node]


def test_nothing_in_deploy_exposes_ray_or_holds_a_credential():
    for path in DEPLOY.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY|RAY_AUTH_TOKEN=\w", text), path
        if path.suffix == ".yaml":
            for document in yaml.safe_load_all(text):
                assert document.get("kind") not in ("Ingress", "Service", "Route"), path
                assert not {"LoadBalancer", "NodePort"} & set(map(str, values(document))), path
    policy = one("kuberay/networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "on-premises.yaml"])
def test_launcher_configs_run_the_image_with_tokens_and_a_loopback_dashboard(name):
    config = one(f"cluster-launcher/{name}")
    assert config["docker"]["image"] == IMAGE
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "/.venv/" not in command and "~/ctsynth" not in command  # the image's ray, no checkout path
    assert config["provider"]["type"] == {"aws-gpu.yaml": "aws", "on-premises.yaml": "local"}[name]


def test_the_dockerfile_builds_ctsynth_on_cuda_pytorch_as_a_non_root_user():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", text, re.M)
    assert re.search(r"torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cu\d+", text)
    assert "pip install ." in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    makefile = (DEPLOY.parent / "Makefile").read_text()
    assert f"IMAGE ?= {IMAGE}" in makefile
