"""`flagscale serve` on Ray with a worker node from the hostfile, for real.

The hostfile names 127.0.0.2, reached through the test's own sshd (conftest's `sshd`: its port and key go in
as experiment.runner.ssh_port / ssh_options): `flagscale serve` starts the Ray head here and joins the worker
node over `ssh -tt` with the head's own `ray`. Each replica reserves as many CPUs as one node has, so Ray
must put one replica on each node. Checked: the cluster has 2 alive nodes (ray.nodes() from a driver connecting
to the head), the worker node's CPUs are its hostfile slots, one replica's engine runs under the worker node's
raylet (below the sshd), completions through the router answer 200 and reach the worker node's replica, and
`action=stop` leaves no process of this run: every process of the run (head, worker raylet and agents,
replicas, engines, the ssh) carries a marker variable from experiment.envs, and none is left afterwards,
while another Ray cluster on the machine (the bystander) stays up. A node that cannot join (its key refused)
fails the start, which leaves nothing behind. The dry run shows each node's exact ssh command (port, options,
quoting); bad ssh settings or hostfile lines are one-line errors.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from llama_cpp_support import (
    REPO_ROOT,
    backend_env,
    flagscale,
    free_port,
    installed_backend,
    post,
    tiny_gguf,
    work_root,
)

pytestmark = pytest.mark.integration
CONF = REPO_ROOT / "examples" / "tiny_llama" / "conf"
pytest.importorskip("ray")
MARK = "FLAGSCALE_TEST_RUN"
HOSTILE = "$(touch PWNED) `touch PWNED2`; touch PWNED3 'x\" &"

NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps([{"alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0), "ip": n["NodeManagerAddress"],
                   "head": "node:__internal_head__" in n["Resources"]} for n in ray.nodes()]))
"""


def _processes() -> dict[int, tuple[int, int, str, bytes]]:
    """pid -> (parent pid, start ticks, command line, environment) of every living process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue
        out[int(entry.name)] = (int(fields[1]), int(fields[19]), cmd.strip(), environ)
    return out


def _of_run(procs: dict, marker: str) -> dict[int, tuple[int, str]]:
    """The processes whose environment carries this run's marker: pid -> (start ticks, command line)."""
    tag = f"{MARK}={marker}".encode()
    return {pid: (ticks, cmd) for pid, (_, ticks, cmd, environ) in procs.items() if tag in environ.split(b"\0")}


def _ancestors(procs: dict, pid: int) -> list[int]:
    chain = []
    while pid in procs and pid not in chain:
        chain.append(pid)
        pid = procs[pid][0]
    return chain


def _logs(run_dir: Path) -> str:
    logs = sorted((run_dir / "logs").glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


def _hydra_quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


@pytest.fixture(scope="module")
def backend() -> dict[str, str]:
    """The environment that makes flagscale use the test's llama.cpp install and tiny model."""
    root = work_root()
    return {**backend_env(installed_backend(root)), "TINY_LLAMA_GGUF": str(tiny_gguf(root))}


@pytest.fixture
def bystander(tmp_path):
    """Another Ray cluster on this machine, started apart from flagscale: stopping the run must not touch it.
    Yields its GCS server and raylet (pid -> start ticks, command line)."""
    marker = uuid.uuid4().hex
    log = open(tmp_path / "bystander.log", "wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--num-cpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", MARK: marker},
    )
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in (tmp_path / "bystander.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "bystander.log").read_text()
            time.sleep(0.3)
        core = {
            pid: v
            for pid, v in _of_run(_processes(), marker).items()
            if "raylet/raylet" in v[1] or "gcs/gcs_server" in v[1]
        }
        assert len(core) == 2, core
        yield core
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # `ray start` and, by Ray's fate sharing, its children
        proc.wait()
        deadline = time.monotonic() + 60
        while _of_run(_processes(), marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        log.close()


def test_dryrun_shows_each_worker_node_s_ssh_command(backend, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=3 type=cpu\n127.0.0.2 slots=1\n")
    base = [
        "serve=tiny_ray",
        f"experiment.exp_dir={tmp_path / 'run'}",
        f"experiment.runner.hostfile={hostfile}",
        "action=dryrun",
    ]
    result = flagscale(
        "serve",
        str(CONF),
        *base,
        "experiment.runner.ssh_port=2200",
        "experiment.runner.ssh_options=['StrictHostKeyChecking=no','ConnectTimeout=5']",
        f"+experiment.envs.EVIL={_hydra_quote(HOSTILE)}",
        env=backend,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    processes = json.loads(result.stdout)["processes"]
    assert [p["name"] for p in processes] == ["ray-head", "ray-worker-localhost", "ray-worker-127.0.0.2", "serve-app"]
    head = processes[0]["cmd"]
    ray = head[0]
    assert os.path.isabs(ray) and head[1:4] == ["start", "--head", "--block"]
    address = "{}:{}".format(
        *(next(a.split("=", 1)[1] for a in head if a.startswith(f"--{k}=")) for k in ("node-ip-address", "port"))
    )
    assert address.split(":")[0] == "127.0.0.1"  # this machine's address on its route to the nodes
    for process, host, slots in ((processes[1], "localhost", 3), (processes[2], "127.0.0.2", 1)):
        cmd = process["cmd"]
        assert cmd[:-1] == [
            "ssh",
            "-tt",
            "-o",
            "BatchMode=yes",
            "-p",
            "2200",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "ConnectTimeout=5",
            "--",
            host,
        ]
        # what the node's shell runs, word for word: experiment.envs, a check that the node has a terminal
        # (then exec: the same process), the head's own ray, the node's slots as its CPUs
        remote = shlex.split(cmd[-1])
        assert remote[:6] == ["env", "--", "RAY_USAGE_STATS_ENABLED=0", f"EVIL={HOSTILE}", "sh", "-c"]
        assert remote[6].startswith("[ -t 0 ] ||") and remote[6].endswith('exec "$@"')
        assert remote[7:] == [
            "flagscale-ray-node",
            ray,
            "start",
            "--block",
            f"--address={address}",
            f"--num-cpus={slots}",
            "--disable-usage-stats",
        ]
    assert not list(tmp_path.glob("PWNED*"))


def test_a_node_without_a_terminal_does_not_start_ray(backend, sshd, tmp_path):
    """An sshd that gives no terminal (PermitTTY no ignores -tt) would leave the node's Ray running after
    action=stop: the exact command flagscale runs, sent without -tt, refuses to start it."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.2 slots=1\n")
    marker = uuid.uuid4().hex
    result = flagscale(
        "serve",
        str(CONF),
        "serve=tiny_ray",
        f"experiment.exp_dir={tmp_path / 'run'}",
        f"experiment.runner.hostfile={hostfile}",
        f"experiment.runner.ssh_port={sshd.port}",
        "experiment.runner.ssh_options=[" + ",".join(f"'{o}'" for o in sshd.options) + "]",
        f"+experiment.envs.{MARK}={marker}",
        "action=dryrun",
        env=backend,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    cmd = json.loads(result.stdout)["processes"][1]["cmd"]
    assert cmd[:2] == ["ssh", "-tt"]
    node = subprocess.run(["ssh", *cmd[2:]], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert node.returncode == 1 and "ssh gave this node no terminal" in node.stderr, node.stdout + node.stderr
    assert "Ray runtime started" not in node.stdout and not _of_run(_processes(), marker)


def test_a_worker_node_with_no_route_fails_before_anything_starts(backend, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("no-such-node.invalid slots=1\n")
    result = flagscale(
        "serve",
        str(CONF),
        "serve=tiny_ray",
        f"experiment.exp_dir={tmp_path / 'run'}",
        f"experiment.runner.hostfile={hostfile}",
        env=backend,
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "worker node no-such-node.invalid" in result.stderr, result.stderr
    assert "no route to it from here" in result.stderr and not (tmp_path / "run" / "pids").exists()


@pytest.mark.parametrize(
    "override, hosts, message",
    [
        (
            "experiment.runner.ssh_options=['-oProxyCommand=x']",
            "node-a slots=1\n",
            "experiment.runner.ssh_options: '-oProxyCommand=x' is not an ssh option (Key=Value)",
        ),
        ("experiment.runner.ssh_options=StrictHostKeyChecking", "node-a slots=1\n", "expected a list of Key=Value"),
        ("experiment.runner.ssh_port=70000", "node-a slots=1\n", "experiment.runner.ssh_port=70000: a TCP port"),
        (None, "node-a gpus=2\n", "hosts:1: 'gpus=2': expected slots=N or type=NAME"),
        (None, "-oProxyCommand=x slots=1\n", "hosts:1: '-oProxyCommand=x' is not a host"),
        (None, "node-a slots=0\n", "slots=0: expected a positive integer"),
    ],
)
def test_bad_ssh_settings_and_hostfiles_fail_in_one_line(backend, tmp_path, override, hosts, message):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(hosts)
    result = flagscale(
        "serve",
        str(CONF),
        "serve=tiny_ray",
        f"experiment.exp_dir={tmp_path / 'run'}",
        f"experiment.runner.hostfile={hostfile}",
        *([override] if override else []),
        env=backend,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "run" / "pids").exists(), "something was started"


def test_a_worker_node_from_the_hostfile_joins_serves_and_stops(backend, sshd, bystander, tmp_path):
    env = backend
    cpus = max(os.cpu_count() or 1, 2)  # the head's CPUs (flagscale gives it max(cores, replicas)), and the worker's
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"# the worker node: this machine, through the test's sshd\n127.0.0.2 slots={cpus}\n")
    run_dir, port, marker = tmp_path / "run", free_port(), uuid.uuid4().hex
    args = [
        "serve=tiny_ray",
        f"experiment.exp_dir={run_dir}",
        f"experiment.runner.port={port}",
        f"+experiment.runner.ray_port={free_port()}",
        "experiment.runner.deploy=ray",
        f"experiment.runner.hostfile={hostfile}",
        f"experiment.runner.ssh_port={sshd.port}",
        "experiment.runner.ssh_options=[" + ",".join(f"'{o}'" for o in sshd.options) + "]",
        "experiment.runner.ready_timeout=300",
        # what the worker node's replicas need too (a node gets experiment.envs, not this shell's variables)
        f"+experiment.envs.FLAGSCALE_LLAMA_CPP_BIN={env['FLAGSCALE_LLAMA_CPP_BIN']}",
        f"+experiment.envs.{MARK}={marker}",
        "serve.0.replicas=2",
        "serve.0.autoscaling.min_replicas=2",
        "serve.0.autoscaling.max_replicas=2",
        f"+serve.0.ray_actor_options={{num_cpus:{cpus}}}",
    ]
    assert not _of_run(_processes(), marker)
    start = time.monotonic()
    result = flagscale("serve", str(CONF), *args, env=env, cwd=tmp_path, timeout=900)
    started_s = time.monotonic() - start
    try:
        assert result.returncode == 0, result.stderr + _logs(run_dir)
        worker = json.loads((run_dir / "pids" / "ray-worker-127.0.0.2.json").read_text())
        assert worker["cmd"][:2] == ["ssh", "-tt"] and str(sshd.port) in worker["cmd"]
        assert worker["cmd"][-1].split()[:3] == ["env", "--", "RAY_USAGE_STATS_ENABLED=0"]
        assert f"{Path(sys.executable).parent / 'ray'} start --block" in worker["cmd"][-1]  # the head's ray

        address = json.loads((run_dir / "serve-app.json").read_text())["_ray_address"]
        nodes = subprocess.run(
            [sys.executable, "-c", NODES, address],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        assert nodes.returncode == 0, nodes.stderr[-3000:]
        alive = [n for n in json.loads(nodes.stdout.strip().splitlines()[-1]) if n["alive"]]
        assert len(alive) == 2, alive
        assert [n["cpus"] for n in alive if not n["head"]] == [cpus], alive

        procs = _processes()
        ours = _of_run(procs, marker)
        head_pid = json.loads((run_dir / "pids" / "ray-head.json").read_text())["pid"]
        on_worker = {pid for pid in ours if sshd.pid in _ancestors(procs, pid)}
        assert any("raylet/raylet" in ours[pid][1] for pid in on_worker), {p: ours[p][1] for p in on_worker}
        records = sorted((run_dir / "replicas").glob("*.json"))
        replicas = [json.loads(p.read_text()) for p in records]
        placed = [
            "worker"
            if sshd.pid in _ancestors(procs, r["engine_pid"])
            else "head"
            if head_pid in _ancestors(procs, r["engine_pid"])
            else "?"
            for r in replicas
        ]
        assert sorted(placed) == ["head", "worker"], (placed, replicas)
        assert all(r["engine_pid"] in ours for r in replicas)

        # Through the front door until the worker node's engine has answered some (least busy, rotating)
        engine_log = run_dir / "logs" / f"replica-{records[placed.index('worker')].stem}.log"

        def served_on_worker() -> int:  # llama-server logs one "stop processing" per finished completion
            return engine_log.read_text(errors="replace").count("stop processing")

        sent = 0
        while sent < 4 or (not served_on_worker() and sent < 40):
            code, body = post(
                f"http://127.0.0.1:{port}/v1/completions",
                {"model": "tiny", "prompt": f"Request {sent}", "max_tokens": 4, "ignore_eos": True},
                timeout=60,
            )
            assert code == 200 and body["usage"]["completion_tokens"] == 4, (code, body)
            sent += 1
        time.sleep(0.5)
        on_worker_node = served_on_worker()
        assert on_worker_node, f"none of {sent} requests through the router reached the worker node's replica"
        remote = replicas[placed.index("worker")]
        code, body = post(
            remote["url"] + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True}, timeout=60
        )  # the engine Ray placed on the worker node, asked directly
        assert code == 200 and body["usage"]["completion_tokens"] == 2, (code, body)
        print(
            f"\nstarted in {started_s:.0f} s: {len(alive)} alive nodes ({[n['cpus'] for n in alive]} CPUs); "
            f"{len(ours)} processes of the run, {len(on_worker)} on the worker node; replicas on {placed}; "
            f"{on_worker_node} of {sent} requests answered on the worker node"
        )
    finally:
        start = time.monotonic()
        stopped = flagscale("serve", str(CONF), *args, "action=stop", env=env, cwd=tmp_path, timeout=300)
        stop_s = time.monotonic() - start
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped serve-app, ray-worker-127.0.0.2, ray-head" in stopped.stdout, stopped.stdout

    deadline = time.monotonic() + 60  # the worker node goes down as its terminal hangs up: a moment after stop
    while (left := _of_run(_processes(), marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    gone_s = time.monotonic() - start
    assert not left, f"processes of the run left after action=stop: {left}"
    assert not [pid for pid, (parent, *_) in _processes().items() if parent == sshd.pid], "an ssh session is left"
    procs = _processes()
    assert all(procs.get(pid, (0, None))[1] == ticks for pid, (ticks, _) in bystander.items()), (
        "stopping the run took down another Ray cluster"
    )
    print(f"stop took {stop_s:.0f} s; every process of the run gone {gone_s:.0f} s after it began")


def test_a_node_that_cannot_join_fails_the_start_and_leaves_nothing(backend, sshd, tmp_path):
    """The sshd refuses the key (BatchMode: no password prompt to hang on): the start fails naming the node and
    ssh's reason, and the head it had started is stopped again."""
    env = backend
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.2 slots=1\n")
    run_dir, marker = tmp_path / "run", uuid.uuid4().hex
    options = [
        f"IdentityFile={tmp_path / 'no-such-key'}",
        *(o for o in sshd.options if not o.startswith("IdentityFile=")),
    ]
    args = [
        "serve=tiny_ray",
        f"experiment.exp_dir={run_dir}",
        f"experiment.runner.port={free_port()}",
        f"+experiment.runner.ray_port={free_port()}",
        f"experiment.runner.hostfile={hostfile}",
        f"experiment.runner.ssh_port={sshd.port}",
        "experiment.runner.ssh_options=[" + ",".join(f"'{o}'" for o in options) + "]",
        f"+experiment.envs.{MARK}={marker}",
    ]
    result = flagscale("serve", str(CONF), *args, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: Ray worker node 127.0.0.2 did not join the head: its ssh exited (255)" in result.stderr
    assert "Permission denied" in result.stderr, result.stderr
    pids = run_dir / "pids"
    assert (pids / "ray-head.stopped").exists() and not (pids / "serve-app.json").exists()  # the app never started
    assert not _of_run(_processes(), marker), "the failed start left processes behind"
