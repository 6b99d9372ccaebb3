"""A multi-node Ray cluster on one machine: each node a ``ray start`` process with its own loopback address
(127.0.0.2, 127.0.0.3, ...), its own CPUs and a ``ctsynth_node_K`` resource, token authentication on. A cluster
of one node is a plain ``ray start --head`` on 127.0.0.1 with multi-node Ray off: every server on loopback only.

What the tests and ``benchmarks/cluster_scaling.py`` submit jobs to, and a way to rehearse the cluster workflow
(``ctsynth submit``, shared outputs, work on several nodes) on a laptop. Why loopback addresses other than
127.0.0.1: ``ray start`` swaps 127.0.0.1 for the machine's network address once multi-node clusters are on, and
nothing here may talk to a non-loopback address. With several nodes, some of Ray's own servers (GCS, raylets,
agents) listen on every interface (Ray's behaviour once multi-node clusters are on; token authentication guards
them); the dashboard and Jobs API listen on 127.0.0.1 only.

Processes are found by their temp folder and ended by PID: ``ray stop`` would also stop any other Ray on the
machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.pipelines.runtime import LOOPBACK


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@dataclass
class LoopbackCluster:
    """``root``: the cluster's folder (Ray's temp files, logs) under /tmp with a short name (Ray's sockets live
    there, and a Unix socket path has at most 107 bytes), made when None. ``node_cpus``: per node, head first.
    ``cores``: per node, the machine's cores its processes may use (``taskset -c``), so that a node of one CPU
    computes on one core as a machine of its own would; None: any core."""

    root: Path | None = None
    node_cpus: tuple[float, ...] = (1, 1)
    cores: tuple[str, ...] | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)

    @property
    def multi_node(self) -> bool:
        return len(self.node_cpus) > 1

    @property
    def head_ip(self) -> str:
        return "127.0.0.2" if self.multi_node else LOOPBACK

    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``--address`` of ctsynth's Ray commands)."""
        return f"{self.head_ip}:{self.port}"

    @property
    def dashboard(self) -> str:
        """The Jobs API (``ctsynth submit --address``)."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def env(self, with_token: bool = True) -> dict[str, str]:
        """An environment for processes of, or clients of, this cluster: this Python's bin first on PATH (the jobs'
        ``python``), multi-node Ray on, and the token (``with_token``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1" if self.multi_node else "0",
                   RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def _ray(self, *args: str, cores: str | None = None) -> None:
        ray = Path(sys.executable).parent / "ray"
        pinned = ["taskset", "-c", cores] if cores else []
        done = subprocess.run([*pinned, str(ray), "start", *args, "--disable-usage-stats"], env=self.env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise CtsynthError(f"ray start {' '.join(args[:2])} failed: {last}")

    def start(self) -> LoopbackCluster:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="ctsynth-cluster-", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        for k, cpus in enumerate(self.node_cpus):
            ip, cores = self.head_ip if k == 0 else f"127.0.0.{2 + k}", self.cores[k] if self.cores else None
            common = [f"--node-ip-address={ip}", f"--num-cpus={cpus:g}", "--num-gpus=0",
                      f"--resources={json.dumps({f'ctsynth_node_{k}': 1})}",
                      f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]  # fmt: skip
            if k == 0:
                self._ray("--head", f"--port={self.port}", f"--dashboard-host={LOOPBACK}",
                          f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                          f"--temp-dir={self.root / 'ray'}", *common, cores=cores)  # fmt: skip
            else:
                self._ray(f"--address={self.address}", *common, cores=cores)
        self.wait_for_nodes()
        self.wait_for_dashboard()
        return self

    def wait_for_dashboard(self, timeout: float = 60) -> None:
        """Until the Jobs API answers (the dashboard's modules start after the nodes join)."""
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # not listening yet, or its modules still starting: try again
            with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.5)
        raise CtsynthError(f"{self.dashboard}: the Ray dashboard did not answer within {timeout:.0f} s (its log: "
                           f"{self.root}/ray/session_latest/logs/dashboard.log)")  # fmt: skip

    def wait_for_nodes(self, timeout: float = 60) -> None:
        code = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run([sys.executable, "-c", code, self.address], env=self.env(), capture_output=True,
                                  text=True, timeout=60)  # fmt: skip
            if done.returncode == 0 and done.stdout.strip() == str(len(self.node_cpus)):
                return
            time.sleep(1)
        raise CtsynthError(f"{self.address}: {len(self.node_cpus)} node(s) did not all join within {timeout:.0f} s")

    def processes(self) -> list[int]:
        """PIDs of this cluster's processes (every one names its temp folder or session in its command line)."""
        if self.root is None:
            return []
        marker = str(self.root / "ray")
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in command or f"{self.head_ip}:{self.port}" in command:
                pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM to every process of the cluster, SIGKILL to any left after ``timeout`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.processes():
                break
        if self.root is not None and self.root.name.startswith("ctsynth-cluster-"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()  # nodes that did start must not outlive a failed start
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
