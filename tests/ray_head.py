"""A real Ray head for tests, started with `ray start --head --block` on loopback and isolated from every other Ray.

Every port is a fresh free one, the session lives in its own temp dir (and RAY_TMPDIR), and teardown kills only
the processes this head started (its process group, then anything still naming its temp dir or GCS port), never
`ray stop`, which would take down every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    gcs_address: str  # 127.0.0.1:PORT, for ray.init / RAY_ADDRESS
    dashboard_url: str  # http://127.0.0.1:PORT, the job server
    temp_dir: Path
    log: Path
    proc: subprocess.Popen
    autoscaling_config: Path | None = None  # the fake autoscaler re-reads it every second

    def set_max_workers(self, node_type: str, n: int) -> None:
        """Change a worker type's cap while the cluster runs (as capacity coming or going would)."""
        config = json.loads(self.autoscaling_config.read_text())
        config["available_node_types"][node_type]["max_workers"] = n
        tmp = self.autoscaling_config.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        tmp.replace(self.autoscaling_config)


def _wait_for_job_server(url: str, proc: subprocess.Popen, log: Path, env: dict, timeout: float) -> None:
    """Poll the job API over plain HTTP (with the head's token, if it has one) until it answers 200."""
    token = env.get("RAY_AUTH_TOKEN")
    headers = {"x-ray-authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/", headers=headers), timeout=5):
                return
        except urllib.error.HTTPError as err:
            if err.code == 401 and not token:
                return  # a token-protected head the caller will authenticate to itself
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray job server at {url} not up after {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(1.0)


def _kill_leftovers(temp_dir: Path, gcs_port: int) -> None:
    """Processes of this head that left its process group: workers, job drivers (they carry RAY_ADDRESS)."""
    import psutil

    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] == me:
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            ours = str(temp_dir) in cmd or f"127.0.0.1:{gcs_port}" in cmd
            if not ours:
                ours = p.environ().get("RAY_ADDRESS", "").endswith(f":{gcs_port}")
            if ours:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def fake_autoscaling_config(gcs_address: str, head_cpus: int, worker_node_types: dict,
                            idle_timeout_minutes: float) -> dict:
    """Ray's fake multi-node autoscaler config (the fake_multi_node/example.yaml that ray.cluster_utils.
    AutoscalingCluster reads, which the ray wheel does not ship): worker "nodes" are extra raylets on this machine,
    launched and terminated by the autoscaler, joining this head's GCS rather than the default port 6379."""
    return {
        "cluster_name": "athanor-fake", "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **worker_node_types},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, extra_args: list[str] | None = None, env: dict | None = None,
             start_timeout: float = 180.0, worker_node_types: dict | None = None, idle_timeout_minutes: float = 0.1):
    """Yield a RayHead; always torn down, even when the body fails. With worker_node_types, the head runs Ray's
    fake multi-node autoscaler, which adds and removes local worker nodes of those types on demand."""
    temp_dir = Path(tempfile.mkdtemp(prefix="athray-", dir="/tmp"))  # short: Unix socket paths have a limit
    gcs_port, dash_port = free_port(), free_port()
    log = temp_dir / "ray-start.log"
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           "--disable-usage-stats", *(extra_args or [])]
    head_env = dict(env if env is not None else os.environ)
    head_env["RAY_TMPDIR"] = str(temp_dir)
    head_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{head_env.get('PATH', '')}"  # job's `python`
    head_env.pop("RAY_ADDRESS", None)
    config = None
    if worker_node_types:
        config = temp_dir / "autoscaling.json"
        config.write_text(json.dumps(fake_autoscaling_config(f"127.0.0.1:{gcs_port}", num_cpus, worker_node_types,
                                                             idle_timeout_minutes)))
        cmd.append(f"--autoscaling-config={config}")
        head_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=head_env, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", temp_dir, log, proc, config)
    try:
        _wait_for_job_server(head.dashboard_url, proc, log, head_env, start_timeout)
        yield head
    finally:
        if proc.poll() is not None:  # died under the test: say so, with its log, for whoever reads the failure
            print(f"ray head exited early ({proc.returncode}):\n{log.read_text()[-3000:]}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:  # `ray start --block` takes its time to wind down on SIGTERM; nothing of this head is kept anyway
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children still in the group
        _kill_leftovers(temp_dir, gcs_port)
        if not os.environ.get("ATHANOR_KEEP_RAY_TMP"):
            shutil.rmtree(temp_dir, ignore_errors=True)
