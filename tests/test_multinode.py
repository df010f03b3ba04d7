"""Two nodes on this machine: two `meshlm train --nodes ...` launchers, each with its own ranks, joined by
torchrun's c10d rendezvous. Where the machine allows it (root, `ip netns`), each node lives in a network
namespace of its own with an address on a veth pair, so the ranks really talk over a network interface;
elsewhere both use 127.0.0.1.

    dp2 x tp2 over 2 nodes of 2 ranks   loss curve == the single-process curve, tp inside a node
    --nodes 1:2, one node killed        the job finishes on the other at world 2 from the last checkpoint
    no peer / other settings            one line naming the endpoint / the node
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshlm.parity import RTOL
from meshlm.settings import build_config
from meshlm.train.trainer import train

SETTINGS = {"model.preset": "gpt-tiny", "model.dropout": "0", "train.batch_size": "8", "train.seq_len": "32",
            "train.eval_every": "0", "train.progress": "false", "train.tensorboard": "false",
            "train.collective_timeout_s": "60"}
STEPS = 8
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "MESHLM_FAULT", "MESHLM_NODE_RANK",
                "MESHLM_NODE_ADDR", "GLOO_SOCKET_IFNAME", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
FAST_RDZV = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=2"
"""After a lost node: drop it after 2 missed 1 s heartbeats, then wait 3 s for more nodes (torch: 15 s and 30 s)."""


@dataclass
class Node:
    addr: str
    prefix: list[str] = field(default_factory=list)
    """`ip netns exec NS` when the node has a namespace of its own."""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Nodes:
    nodes: list[Node]
    why_not_netns: str = ""
    """Empty when the nodes are network namespaces; else why they share 127.0.0.1."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def two_nodes():
    """Two network namespaces joined by a veth pair (10.213.0.1 and .2), removed afterwards; else 127.0.0.1."""
    tag = uuid.uuid4().hex[:6]
    names = [f"mlA{tag}", f"mlB{tag}"]
    links = [f"vA{tag}", f"vB{tag}"]
    made: list[str] = []
    try:
        if os.geteuid() != 0:
            raise PermissionError("not root")
        for ns in names:
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        nodes = []
        for i, (ns, link) in enumerate(zip(names, links)):
            addr = f"10.213.0.{i + 1}"
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            nodes.append(Node(addr, ["ip", "netns", "exec", ns], {"GLOO_SOCKET_IFNAME": link}))
        yield Nodes(nodes)
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", b"") or b""
        why = (err.decode(errors="replace").strip() or str(e)).splitlines()[0]
        yield Nodes([Node("127.0.0.1"), Node("127.0.0.1")], why_not_netns=f"ip netns unavailable: {why}")
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nodes: Nodes, i: int, port: int, argv: list[str], log: Path, *, nodes_arg: str = "2",
            fault: str | None = None) -> subprocess.Popen:
    """Node i's launcher: `meshlm train --nodes ... --node-rank i --rdzv NODE0:PORT ARGV` (its own session)."""
    node = nodes.nodes[i]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **node.env, **({"MESHLM_FAULT": fault} if fault else {}))
    local = [] if nodes.why_not_netns else ["--local-addr", node.addr]
    cmd = [*node.prefix, sys.executable, "-m", "meshlm", "train", "--nodes", nodes_arg, "--node-rank", str(i),
           "--rdzv", f"{nodes.nodes[0].addr}:{port}", *local, *argv]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _settings_argv(data_path, out_dir, **extra) -> list[str]:
    merged = {**SETTINGS, "data.path": str(data_path), "train.out_dir": str(out_dir), **extra}
    return [a for k, v in merged.items() for a in (f"--{k}", str(v))]


def _losses(out_dir: Path) -> list[tuple[int, float]]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines() if (out_dir / "metrics.jsonl").is_file() else []
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_node(proc: subprocess.Popen) -> None:
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _finish(procs: list[subprocess.Popen], timeout: float = 240, grace: float = 20) -> list[int | None]:
    """The launchers' exit codes; once one fails, the others get `grace` seconds (a node whose peer failed would
    otherwise wait out torchrun's 300 s exit barrier); None for one killed at the end."""
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() > failed_at + grace:
                break
            time.sleep(0.1)
        return [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_node(p)


@pytest.fixture(scope="module")
def single_curve(tiny_dataset, tmp_path_factory):
    """The single-process loss curve of the same config (this process)."""
    out = tmp_path_factory.mktemp("single")
    overrides = {**SETTINGS, "data.path": str(tiny_dataset.path), "train.out_dir": str(out), "train.steps": str(STEPS)}
    return train(build_config(overrides=overrides))["losses"]


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tiny_dataset, tmp_path_factory):
    """dp2 x tp2 over two nodes of two ranks each: (exit codes, both outputs, out_dir)."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    argv = _settings_argv(tiny_dataset.path, tmp / "run", **{"layout.dp": 2, "layout.tp": 2, "train.steps": 6})
    port = _free_port()
    procs = [_launch(two_nodes, i, port, argv, tmp / f"node{i}.log") for i in (0, 1)]
    codes = _finish(procs)
    return codes, "\n".join((tmp / f"node{i}.log").read_text() for i in (0, 1)), tmp / "run"


def test_two_nodes_train_like_one_process(two_node_run, single_curve):
    codes, output, out_dir = two_node_run
    assert codes == [0, 0], output[-4000:]
    steps = _losses(out_dir)
    assert [s for s, _ in steps] == list(range(1, 7))
    for (step, loss), ref in zip(steps, single_curve):
        assert abs(loss - ref) <= RTOL * abs(ref), (step, loss, ref)


def test_placement_is_printed_at_start(two_node_run):
    _, output, _ = two_node_run
    assert "meshlm: placement of dp2 x tp2 on 2 nodes of 2 ranks: tp inside a node; dp across nodes" in output
    rows = [line.split() for line in output.splitlines() if line.startswith("  0 ") or line.startswith("  1 ")]
    assert [r[0] for r in rows] == ["0", "1"]
    assert " ".join(rows[0]).endswith("0 dp0 tp0 1 dp0 tp1") and " ".join(rows[1]).endswith("2 dp1 tp0 3 dp1 tp1")


def test_ranks_talk_over_a_veth_pair(two_nodes, two_node_run):
    if two_nodes.why_not_netns:
        pytest.skip(f"the two nodes shared 127.0.0.1: {two_nodes.why_not_netns}")
    _, output, _ = two_node_run
    hosts = [line for line in output.splitlines() if line.startswith(("  0 ", "  1 "))]
    assert "(10.213.0.1)" in hosts[0] and "(10.213.0.2)" in hosts[1], hosts


def test_a_lost_node_restarts_the_job_on_the_other_at_the_smaller_size(two_nodes, tiny_dataset, tmp_path,
                                                                          single_curve):
    """--nodes 1:2 --max-restarts 1: node 1 (its launcher and ranks) is killed mid-run; node 0's ranks fail, its
    launcher re-rendezvouses alone, dp is refitted 2 -> 1 and the run resumes from the newest checkpoint (read
    under the new layout) and finishes: every step's loss, before and after, is the single-process loss."""
    out = tmp_path / "run"
    argv = _settings_argv(tiny_dataset.path, out, **{"layout.dp": 2, "layout.tp": 2, "train.steps": STEPS,
                                                     "train.ckpt_every": 2, "train.keep_ckpts": 5})
    argv += ["--max-restarts", "1", "--rdzv-conf", FAST_RDZV]
    port = _free_port()
    slow = "slow,rank=0,seconds=1"  # the first attempt only: time to kill a node in the middle
    procs = [_launch(two_nodes, i, port, argv, tmp_path / f"node{i}.log", nodes_arg="1:2", fault=slow)
             for i in (0, 1)]
    try:
        deadline = time.monotonic() + 180
        while not (len(_losses(out)) >= 3 and (out / "ckpt" / "step_000002" / "manifest.json").is_file()):
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(0.05)
        _kill_node(procs[1])
        code = _finish(procs[:1])[0]
    finally:
        _finish(procs, timeout=1)
    output = (tmp_path / "node0.log").read_text()
    assert code == 0, output[-4000:]
    assert "meshlm: elastic: 2 ranks joined; layout.dp 2 -> 1 (tp2), global batch 8 unchanged" in output
    assert "restart 1 of the job: resuming from the newest complete checkpoint" in output
    assert "on tp2, cpu" in output  # the run after the restart
    steps = _losses(out)
    assert [s for s, _ in steps][-1] == STEPS and len(steps) > STEPS  # some steps logged twice, before and after
    for step, loss in steps:
        ref = single_curve[step - 1]
        assert abs(loss - ref) <= RTOL * abs(ref), (step, loss, ref)


def test_a_rendezvous_no_peer_joins_ends_in_one_line(two_nodes, tiny_dataset, tmp_path):
    """Node 0 alone waits for a second node; node 1 alone finds no store: both end after 3 s with one line."""
    argv = _settings_argv(tiny_dataset.path, tmp_path / "run", **{"layout.dp": 2}) + ["--rdzv-timeout", "3"]
    ports = [_free_port(), _free_port()]
    procs = [_launch(two_nodes, i, ports[i], argv, tmp_path / f"node{i}.log") for i in (0, 1)]
    codes = _finish(procs, timeout=120)
    lines = [(tmp_path / f"node{i}.log").read_text().strip().splitlines()[-1] for i in (0, 1)]
    host = two_nodes.nodes[0].addr
    assert codes[0] != 0 and lines[0] == (
        f"meshlm: error: rendezvous at {host}:{ports[0]} (id meshlm) timed out after 3 s: 1 of 2 nodes joined; start "
        "every node with the same --rdzv, --rdzv-id and --nodes")
    assert codes[1] != 0 and lines[1] == (
        f"meshlm: error: rendezvous at {host}:{ports[1]}: no rendezvous store answered within 3 s (0 of 2 nodes "
        "joined); start the node with --node-rank 0 on that host, or check the address and port")


def test_a_node_started_with_other_settings_is_named(two_nodes, tiny_dataset, tmp_path):
    argv = _settings_argv(tiny_dataset.path, tmp_path / "run", **{"layout.dp": 2, "train.steps": 2})
    port = _free_port()
    procs = [_launch(two_nodes, i, port, argv + (["--model.n_layers", "3"] if i else []), tmp_path / f"node{i}.log")
             for i in (0, 1)]
    assert _finish(procs) == [2, 2]  # bad input: exit 2
    for i in (0, 1):
        errors = [line for line in (tmp_path / f"node{i}.log").read_text().splitlines()
                  if line.startswith("meshlm: error:")]
        assert errors[0].startswith("meshlm: error: node 1 (host ") and "--node-rank 1, rank 1)" in errors[0]
        assert errors[0].endswith("model.n_layers 3 (node 0: 2); start every node with the same settings"), errors
