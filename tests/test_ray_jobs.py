"""The library in Ray jobs, the way most Ray users run code: a long-running
cluster started with ``ray start --head`` (on loopback, stopped afterwards),
jobs submitted through the job server.

- a job that deploys, calls and exits ends SUCCEEDED, its results in its logs;
- a detached service deployed by job 1 is called by job 2;
- services owned by a job that was stopped leave the registry: a caller gets
  ServiceNotFound, fast;
- two jobs at once: different buses never see each other, one bus is shared;
- ``sage-comm status``/``metrics --address auto`` read the cluster from a shell;
- ``bus.start()`` attaches to the running cluster (``RAY_ADDRESS`` or the
  current cluster file) and starts a local Ray only when there is none;
- ``sage-comm demo`` and the examples join the running cluster, as a plain
  ``ray.init()`` does, and leave no bus on it.

Isolation: this module's cluster is the machine's "current cluster" while it
runs; the suite's own Ray (``ray_session``) is started with
``address="local"`` and never joins it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from _ports import free_port

from sage_ray_comm import shm
from sage_ray_comm.router import bus_namespace

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "_job_app.py")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# A throwaway loopback cluster: no token prompt for the job client.
ENV = dict(os.environ, RAY_AUTH_MODE="disabled")
ENV.pop("RAY_ADDRESS", None)


def _local_probe(env: dict) -> dict:
    """A fresh process that only starts a bus, then says which Ray it is on."""
    code = (
        "import json, ray\n"
        "from sage_ray_comm import get_communication_bus\n"
        "get_communication_bus('probe').start()\n"
        "ctx = ray.get_runtime_context()\n"
        "from sage_ray_comm import lifecycle\n"
        "print('RESULT ' + json.dumps({'gcs': ctx.gcs_address, 'owned': lifecycle.owns_ray()}), flush=True)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def test_bus_start_without_a_cluster_starts_a_local_ray():
    # Runs before the module's cluster exists (file order). Ray's temp folder
    # is a fresh one, so no current-cluster file another run left on this
    # machine is found: this is a machine without a cluster.
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        r = _local_probe(dict(ENV, RAY_TMPDIR=tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r["owned"] is True


def _cluster_pids(port: int, session_dir: str) -> list:
    """The processes of the cluster started on ``port``: those naming its
    session folder or its GCS port. (Its workers are the raylet's children
    and end with it.) Never `ray stop`: that would kill every Ray on the
    machine, the suite's own included."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (session_dir and session_dir in cmd) or f":{port} " in cmd + " " or f"_port={port} " in cmd + " ":
            pids.append(int(d))
    return pids


def _stop_cluster(port: int, session_dir: str) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        pids = _cluster_pids(port, session_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while _cluster_pids(port, session_dir) and time.monotonic() < end:
            time.sleep(0.1)  # other processes' exits: nothing to block on
    current = "/tmp/ray/ray_current_cluster"
    try:
        if open(current).read().strip().endswith(f":{port}"):
            os.unlink(current)  # as `ray stop` does, for this cluster only
    except OSError:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # This module's own calls (the job client) talk to its cluster: Ray's job
    # client takes RAY_ADDRESS over the URL it is given, so the suite's
    # RAY_ADDRESS=local (conftest) is lifted while the module runs.
    with pytest.MonkeyPatch.context() as env:
        env.delenv("RAY_ADDRESS", raising=False)
        yield from _cluster(tmp_path_factory)


def _cluster(tmp_path_factory):
    port, dash = free_port(), free_port()
    p = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--disable-usage-stats",
            # its own ports: the suite's Ray on this machine holds the defaults
            *(
                f"--{flag}={free_port()}"
                for flag in (
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "metrics-export-port",
                    "runtime-env-agent-port",
                    "ray-client-server-port",
                    "node-manager-port",
                    "object-manager-port",
                )
            ),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=180,
    )
    session_dir = os.path.realpath("/tmp/ray/session_latest")
    gcs = [pid for pid in _cluster_pids(port, "") if b"gcs_server" in open(f"/proc/{pid}/cmdline", "rb").read()]
    if gcs:  # the session folder this cluster's processes name
        cmd = open(f"/proc/{gcs[0]}/cmdline", "rb").read().decode(errors="replace")
        session_dir = cmd.split("--log_dir=")[1].split("/logs")[0] if "--log_dir=" in cmd else session_dir
    if p.returncode != 0:
        _stop_cluster(port, session_dir)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    from ray.job_submission import JobSubmissionClient

    url = f"http://127.0.0.1:{dash}"
    buses: list = []
    try:
        end = time.monotonic() + 60
        while True:
            try:
                client = JobSubmissionClient(url)
                break
            except Exception:
                assert time.monotonic() < end, "the job server did not come up"
                time.sleep(0.5)  # the dashboard's job server starts after `ray start` returns
        yield {
            "address": f"127.0.0.1:{port}",
            "url": url,
            "client": client,
            "buses": buses,
            "tmp": tmp_path_factory.mktemp("jobs"),
        }
    finally:
        _stop_cluster(port, session_dir)
        for b in buses:  # what `ray stop` killed mid-flight
            shm.gc(bus_namespace(b), keep_legacy=False)


def submit(cluster, *argv: str) -> str:
    return cluster["client"].submit_job(
        entrypoint=" ".join([sys.executable, APP, *argv]), runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}}
    )


def finish(cluster, job_id: str, timeout: float = 180.0) -> tuple:
    from ray.job_submission import JobStatus

    client = cluster["client"]
    end = time.monotonic() + timeout
    while True:
        st = client.get_job_status(job_id)
        if st in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            logs = client.get_job_logs(job_id)
            return st, logs, [ln[len("RESULT ") :] for ln in logs.splitlines() if ln.startswith("RESULT ")]
        assert time.monotonic() < end, f"job {job_id} still {st}:\n{client.get_job_logs(job_id)[-3000:]}"
        time.sleep(0.2)  # the job server's state: nothing to block on


def new_bus(cluster, stem: str) -> str:
    b = f"{stem}-{uuid.uuid4().hex[:6]}"
    cluster["buses"].append(b)
    return b


def sage_comm(*argv: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "sage-comm")
    return subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120, env=ENV)


@pytest.mark.timeout(300)
def test_a_job_that_deploys_and_calls_succeeds(cluster):
    from ray.job_submission import JobStatus

    bus = new_bus(cluster, "jobs")
    st, logs, res = finish(cluster, submit(cluster, "deploy-and-call", bus))
    assert st == JobStatus.SUCCEEDED, logs[-4000:]
    assert res == ["squares [0, 1, 4, 9, 16]"]
    assert "Traceback" not in logs
    # its services were its own: they left the registry with it
    out = sage_comm("status", "--address", cluster["address"], "--bus", bus)
    assert out.returncode == 0, out.stderr
    assert "worker" not in out.stdout, out.stdout


@pytest.mark.timeout(400)
def test_detached_service_outlives_its_job_and_the_shell_sees_it(cluster):
    from ray.job_submission import JobStatus

    bus = new_bus(cluster, "keep")
    st, logs, res = finish(cluster, submit(cluster, "deploy-detached", bus))
    assert st == JobStatus.SUCCEEDED and res == ["hello job1, I have met 1"], logs[-4000:]
    st, logs, res = finish(cluster, submit(cluster, "call-keeper", bus))
    assert st == JobStatus.SUCCEEDED and res == ["hello job2, I have met 2"], logs[-4000:]
    # from a shell, as an operator would look
    status = sage_comm("status", "--address", "auto", "--bus", bus)
    assert status.returncode == 0 and "keeper" in status.stdout and "hello" in status.stdout, (
        status.stdout + status.stderr
    )
    metrics = sage_comm("metrics", "--address", "auto", "--bus", bus)
    assert metrics.returncode == 0, metrics.stderr
    assert "ray_sage_calls_total" in metrics.stdout and f'bus="{bus}"' in metrics.stdout, metrics.stdout[-3000:]
    st, logs, res = finish(cluster, submit(cluster, "shutdown", bus))
    assert st == JobStatus.SUCCEEDED and res == ["bus shut down"], logs[-3000:]
    assert shm.list_segments(bus_namespace(bus)) == []


@pytest.mark.timeout(300)
def test_services_of_a_stopped_job_leave_the_registry(cluster):
    from ray.job_submission import JobStatus

    bus = new_bus(cluster, "owned")
    job = submit(cluster, "deploy-and-hang", bus)
    end = time.monotonic() + 120
    while "RESULT deployed" not in cluster["client"].get_job_logs(job):
        assert time.monotonic() < end, cluster["client"].get_job_logs(job)[-3000:]
        time.sleep(0.2)
    cluster["client"].stop_job(job)  # no exit hook runs: Ray kills the driver, then its actors
    st, _, _ = finish(cluster, job)
    assert st == JobStatus.STOPPED
    st, logs, res = finish(cluster, submit(cluster, "expect-gone", bus))
    assert st == JobStatus.SUCCEEDED, logs[-4000:]
    (r,) = res
    assert r.startswith("ServiceNotFound") and "no service 'worker'" in r, r
    assert float(r.split(" after ")[1].split(" s")[0]) < 2.0  # no hang, no stale entry to time out on


@pytest.mark.timeout(400)
def test_two_jobs_at_once(cluster):
    from ray.job_submission import JobStatus

    folder = str(cluster["tmp"] / uuid.uuid4().hex[:6])
    os.makedirs(folder)
    a, b = new_bus(cluster, "twin-a"), new_bus(cluster, "twin-b")
    # different buses: the same service name, never mixed
    ja = submit(cluster, "twin", a, "alpha", "beta", folder)
    jb = submit(cluster, "twin", b, "beta", "alpha", folder)
    (sa, la, ra), (sb, lb, rb) = finish(cluster, ja), finish(cluster, jb)
    assert sa == sb == JobStatus.SUCCEEDED, la[-3000:] + lb[-3000:]
    assert ra == ["alpha sees alpha ['same']"] and rb == ["beta sees beta ['same']"]
    # one bus: the second deploy of identical code keeps the first's replica, both jobs reach it
    shared = new_bus(cluster, "twin-shared")
    folder2 = folder + "-2"
    os.makedirs(folder2)
    j1 = submit(cluster, "twin", shared, "one", "two", folder2)
    j2 = submit(cluster, "twin", shared, "two", "one", folder2)
    (s1, l1, r1), (s2, l2, r2) = finish(cluster, j1), finish(cluster, j2)
    assert s1 == s2 == JobStatus.SUCCEEDED, l1[-3000:] + l2[-3000:]
    seen = {r1[0].split(" sees ")[1].split(" [")[0], r2[0].split(" sees ")[1].split(" [")[0]}
    assert len(seen) == 1, (r1, r2)  # one service on the shared bus, whichever job's code got there first


def test_bus_start_attaches_to_the_running_cluster(cluster):
    on_file = _local_probe(ENV)  # the current cluster file
    on_env = _local_probe(dict(ENV, RAY_ADDRESS=cluster["address"]))  # RAY_ADDRESS
    for r in (on_file, on_env):
        # Ray names the GCS by the host's address; the port is the cluster's
        assert r["gcs"].rsplit(":", 1)[1] == cluster["address"].rsplit(":", 1)[1] and r["owned"] is False, r


@pytest.mark.timeout(400)
def test_demo_and_examples_join_the_running_cluster(cluster):
    """What a plain `ray.init()` does on a machine that runs a cluster: the
    demo and the examples join it (they ask for no resources, which Ray
    refuses when joining) and leave no bus behind on it."""
    exe = os.path.join(os.path.dirname(sys.executable), "sage-comm")
    demo = subprocess.run([exe, "demo", "--records", "300"], capture_output=True, text=True, timeout=180, env=ENV)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    port = cluster["address"].rsplit(":", 1)[1]
    (line,) = [ln for ln in demo.stdout.splitlines() if ln.lstrip().startswith("ray ")]
    assert "the running cluster at " in line and f":{port}, bus " in line, line
    demo_bus = line.rsplit("bus ", 1)[1]
    cluster["buses"].append(demo_bus)
    assert "check             OK" in demo.stdout, demo.stdout
    cluster["buses"].append("example-lb")
    ex = subprocess.run(
        [sys.executable, "examples/load_balanced_service.py"],
        cwd=os.path.dirname(HERE),
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
    )
    assert ex.returncode == 0, ex.stdout[-3000:] + ex.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in ex.stderr, ex.stderr[-2000:]
    # both ended their buses on the cluster they joined: no router, no segment
    for b in (demo_bus, "example-lb"):
        status = sage_comm("status", "--address", cluster["address"], "--bus", b)
        assert status.returncode != 0 and f"no bus '{b}'" in status.stderr + status.stdout, (
            status.stdout + status.stderr
        )
        assert shm.list_segments(bus_namespace(b)) == []


@pytest.mark.timeout(300)
def test_readme_job_with_ray_job_submit(cluster):
    """The README's command, verbatim but for the address: the job prints its
    results and the CLI (which waits for the job) reports it SUCCEEDED."""
    cluster["buses"].append("jobs-demo")
    repo = os.path.dirname(HERE)
    p = subprocess.run(
        [RAY, "job", "submit", "--address", cluster["url"], "--working-dir", "examples", "--", "python", "ray_job.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=240,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "'Ray actor calls': 3 words, 2 known (Tokens)" in p.stdout
    assert "services: dictionary, tokenizer" in p.stdout
    assert "succeeded" in p.stdout.lower(), p.stdout[-2000:]
    print(p.stdout)  # what the README quotes
