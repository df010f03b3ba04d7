"""Multi-node launching without a cluster: rank-to-node placement, node flags, the elastic rule, the
settings check between nodes, and the SLURM / Kubernetes files (parsed, never submitted)."""

import json
import shutil
import subprocess

import pytest
import torch.distributed as dist

from meshlm.cli import main
from meshlm.config import ConfigError
from meshlm.launch import (RankInfo, RendezvousWatch, agree_on_settings, fit_layout, parse_node_flags,
                           pytorchjob_manifest, run_settings, sbatch_script, settings_mismatch, slow_join_warning,
                           to_yaml)
from meshlm.layout import Layout, LayoutError
from meshlm.mesh import Placement, axis_nodes
from meshlm.plan.cost import axis_link
from meshlm.plan.hardware import cluster
from meshlm.settings import build_config

# --- placement ----------------------------------------------------------------------------------------

SHAPES = [  # (nodes, ranks per node, layout, node of each rank, axes inside a node, axes across nodes)
    (2, 2, Layout(dp=2, tp=2), [0, 0, 1, 1], ["tp"], ["dp"]),
    (2, 4, Layout(dp=2, tp=2, pp=2, micro_batches=2), [0] * 4 + [1] * 4, ["tp", "dp"], ["pp"]),
    (4, 8, Layout(dp=2, tp=8, pp=2, micro_batches=2), [n for n in range(4) for _ in range(8)], ["tp"], ["dp", "pp"]),
    (2, 2, Layout(tp=4), [0, 0, 1, 1], [], ["tp"]),
    (4, 2, Layout(dp=2, cp=2, tp=2), [0, 0, 1, 1, 2, 2, 3, 3], ["tp"], ["cp", "dp"]),
    (2, 4, Layout(dp=2, ep=2, tp=2), [0] * 4 + [1] * 4, ["tp", "ep"], ["dp"]),
    (1, 8, Layout(dp=2, tp=4), [0] * 8, ["tp", "dp"], []),
    (2, 6, Layout(dp=3, tp=4), [0] * 6 + [1] * 6, [], ["tp", "dp"]),  # tp 4 on nodes of 6: ranks 4-7 straddle
]


@pytest.mark.parametrize("nodes, per_node, layout, node_of, inside, across", SHAPES)
def test_rank_grid_on_nodes(nodes, per_node, layout, node_of, inside, across):
    p = Placement.contiguous(layout, per_node)
    assert list(p.node_of) == node_of and p.n_nodes == nodes and p.per_node == per_node
    assert p.inside() == inside and p.across() == across
    chatty = {"tp", "cp", "ep"}
    assert len(p.warnings()) == len(chatty & set(p.across()))


def test_tp_inside_a_node_pp_across_for_dp2_tp2_pp2_on_two_nodes_of_four():
    p = Placement(Layout(dp=2, tp=2, pp=2, micro_batches=2), (0, 0, 0, 0, 1, 1, 1, 1), ("host-a", "host-b"))
    assert p.describe() == ("placement of pp2 x dp2 x tp2 (1f1b, 2 micro-batches) on 2 nodes of 4 ranks: "
                            "tp, dp inside a node; pp across nodes")
    assert p.table().splitlines() == [
        "  node  host    local 0        local 1        local 2        local 3",
        "  0     host-a  0 pp0 dp0 tp0  1 pp0 dp0 tp1  2 pp0 dp1 tp0  3 pp0 dp1 tp1",
        "  1     host-b  4 pp1 dp0 tp0  5 pp1 dp0 tp1  6 pp1 dp1 tp0  7 pp1 dp1 tp1"]
    assert p.warnings() == []


def test_axis_crossing_nodes_is_warned_with_the_reason():
    (tp,) = Placement.contiguous(Layout(tp=4), 2).warnings()
    assert tp.startswith("tp (4) crosses nodes: a tp group spans 2 nodes (2 ranks per node); tensor parallelism "
                         "all-reduces the activations of every layer")
    assert tp.endswith("keep tp (4) a divisor of the ranks per node (2)")
    (sp,) = Placement.contiguous(Layout(tp=4, sequence_parallel=True), 2).warnings()
    assert "all-gather and reduce-scatter" in sp
    (cp,) = Placement.contiguous(Layout(dp=2, cp=2, tp=2), 2).warnings()
    assert cp.startswith("cp (2) crosses nodes") and "ring attention" in cp and "keep tp*cp (4)" in cp
    (ep,) = Placement.contiguous(Layout(ep=4), 2).warnings()
    assert "all-to-all" in ep


def test_placement_from_the_nodes_ranks_report():
    """A launcher that numbers ranks round-robin over the nodes puts every tp pair across them."""
    p = Placement(Layout(dp=2, tp=2), (0, 1, 0, 1))
    assert p.across() == ["tp"] and p.inside() == ["dp"]
    assert axis_nodes(Layout(dp=2, tp=2), "tp", node_of=[0, 1, 0, 1]) == 2


@pytest.mark.parametrize("layout", [Layout(tp=8, dp=4), Layout(tp=2, cp=4, dp=2), Layout(tp=4, ep=2, dp=2, pp=2),
                                    Layout(tp=16, dp=2), Layout(dp=2, ep=4, cp=2, tp=2)])
def test_the_planner_costs_links_by_the_same_placement(layout):
    net = cluster("h100", gpus_per_node=8)
    for axes in [("tp",), ("cp",), ("ep",), ("dp",), ("pp",), ("dp", "ep", "cp"), ("dp", "cp")]:
        inside = axis_nodes(layout, axes, gpus_per_node=8) == 1
        assert axis_link(layout, axes, net)[1] == (net.intra_bw if inside else net.inter_bw), axes


# --- node flags and the elastic rule --------------------------------------------------------------------

def test_node_flags_are_taken_out_of_the_arguments():
    spec, rest = parse_node_flags(["--layout.tp", "2", "--nodes", "1:2", "--rdzv=10.0.0.1:29400", "--node-rank", "0",
                                   "--rdzv-conf", "last_call_timeout=2", "--local-addr", "10.0.0.1"])
    assert rest == ["--layout.tp", "2"]
    assert (spec.min_nodes, spec.max_nodes, spec.elastic, spec.nnodes) == (1, 2, True, "1:2")
    assert spec.conf() == {"join_timeout": "600", "read_timeout": "600", "is_host": "true", "last_call_timeout": "2"}
    assert spec.nproc(Layout(dp=2, tp=2)) == 2 and spec.local_addr == "10.0.0.1"
    assert parse_node_flags(["--layout.tp", "2"]) == (None, ["--layout.tp", "2"])


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes ('0') must be N or MIN:MAX with 1 <= MIN <= MAX"),
    (["--nodes", "3:2"], "--nodes ('3:2') must be N or MIN:MAX with 1 <= MIN <= MAX"),
    (["--nodes", "2"], "--nodes (2) needs --rdzv HOST:PORT"),
    (["--rdzv", "h:1"], "--rdzv needs --nodes N"),
    (["--nodes", "2", "--rdzv", "host"], "--rdzv ('host') must be HOST:PORT with a port in 1..65535"),
    (["--nodes", "2", "--rdzv", "h:1", "--node-rank", "2"], "--node-rank (2) must be below the most nodes (2)"),
    (["--nodes", "2", "--rdzv", "h:1", "--rdzv-timeout", "0"], "--rdzv-timeout ('0') must be a positive number"),
    (["--nodes", "2", "--rdzv", "h:1", "--nproc-per-node", "0"], "--nproc-per-node ('0') must be an integer >= 1"),
    (["--nodes", "2", "--rdzv", "h:1", "--rdzv-conf", "x"], "--rdzv-conf ('x') must be KEY=VALUE"),
    (["--nodes"], "--nodes needs a value"),
])
def test_bad_node_flags_end_with_one_line(capsys, argv, message):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meshlm: error: " + message), err


def test_node_counts_must_fit_the_layout(capsys, tiny_dataset, tmp_path):
    base = ["train", "--model", "gpt-tiny", "--data.path", str(tiny_dataset.path), "--train.batch_size", "8",
            "--rdzv", "127.0.0.1:1"]
    assert main([*base, "--nodes", "2", "--layout.dp", "3", "--train.batch_size", "12"]) == 2
    assert "layout's world size (3) must be a multiple of the most nodes (2)" in capsys.readouterr().err
    assert main([*base, "--nodes", "2", "--nproc-per-node", "4", "--layout.tp", "2"]) == 2
    assert "pp*dp*ep*cp*tp (2) must equal nodes x ranks per node (2 x 4 = 8)" in capsys.readouterr().err
    assert main([*base, "--nodes", "1:3", "--nproc-per-node", "2", "--layout.dp", "2", "--layout.tp", "2",
                 "--train.out_dir", str(tmp_path)]) == 2
    assert ("--nodes 1:3: at 3 nodes (6 ranks): batch_size (8) must be divisible by dp*ep*micro_batches (3)"
            in capsys.readouterr().err)
    assert main([*base, "--nodes", "2", "--layout.dp", "2"]) == 2
    assert "train.out_dir must be given for a run over several nodes" in capsys.readouterr().err


def test_elastic_rule_refits_dp_only():
    lay = Layout(dp=2, tp=2, pp=2, micro_batches=2, zero=1)
    assert fit_layout(lay, 4) == lay.replace(dp=1)
    assert fit_layout(lay, 16) == lay.replace(dp=4)
    with pytest.raises(LayoutError, match=r"world size \(6\) must be a multiple of pp\*ep\*cp\*tp \(4\)"):
        fit_layout(lay, 6)


# --- the same settings on every node ------------------------------------------------------------------------

def _infos(digests, per_node=2):
    return [RankInfo(node=str(r // per_node), host=f"h{r // per_node}", digest=d, node_flag=str(r // per_node))
            for r, d in enumerate(digests)]


def test_settings_mismatch_names_the_node_and_the_fields():
    assert settings_mismatch(_infos("aaaa")) is None
    a = {"layout.dp": 2, "model.n_layers": 2, "train.out_dir": "runs/x"}
    b = {"layout.dp": 2, "model.n_layers": 3, "train.out_dir": "runs/y"}
    line = settings_mismatch(_infos("aabb"), [a, a, b, b])
    assert line == ("node 1 (host h1, --node-rank 1, ranks 2-3) was started with other settings than node 0 (host h0, "
                    "--node-rank 0, ranks 0-1): model.n_layers 3 (node 0: 2), train.out_dir 'runs/y' (node 0: "
                    "'runs/x'); start every node with the same settings (give --train.out_dir a folder every node "
                    "sees)")
    assert settings_mismatch(_infos("aaab")).startswith("rank 3 on node 1 (host h1")


def test_node_local_settings_may_differ(tiny_dataset):
    a = build_config(overrides={"data.path": str(tiny_dataset.path), "train.threads": "1"})
    b = build_config(overrides={"data.path": "/elsewhere", "train.threads": "4", "train.progress": "false"})
    assert run_settings(a) == run_settings(b)
    assert "data (tokens)" in run_settings(a, tiny_dataset)
    assert run_settings(build_config(overrides={"layout.tp": "2"})) != run_settings(a)


def _agree(n_layers):
    """On each rank of the pool: ranks 2, 3 play a second node started with another model."""
    rank = dist.get_rank()
    cfg = build_config(overrides={"model.preset": "gpt-tiny", "layout.dp": "4",
                                  "model.n_layers": str(n_layers if rank >= 2 else 2)})
    from meshlm.launch import settings_digest
    info = RankInfo(node=str(rank // 2), host=f"h{rank // 2}", digest=settings_digest(run_settings(cfg)))
    try:
        placement = agree_on_settings(cfg, info=info)
    except ConfigError as e:
        return str(e)
    return placement.describe(), placement.hosts


def test_nodes_compare_their_settings_at_start(dist):
    pool = dist(4)
    same = pool.run(_agree, 2)
    assert same[0] == ("placement of dp4 on 2 nodes of 2 ranks: dp across nodes", ("h0", "h1")) and len(set(same)) == 1
    other = pool.run(_agree, 3)
    assert len(set(other)) == 1 and other[0] == (
        "node 1 (host h1, ranks 2-3) was started with other settings than node 0 (host h0, ranks 0-1): "
        "model.n_layers 3 (node 0: 2); start every node with the same settings")


# --- failures that say where ---------------------------------------------------------------------------

def test_rendezvous_failure_lines():
    spec, _ = parse_node_flags(["--nodes", "2", "--rdzv", "10.0.0.1:29400", "--rdzv-timeout", "30"])
    watch = RendezvousWatch(spec)
    assert watch.failure(connection=True) == (
        "rendezvous at 10.0.0.1:29400: no rendezvous store answered within 30 s (0 of 2 nodes joined); start the node "
        "with --node-rank 0 on that host, or check the address and port")
    watch.answered, watch.rounds = True, {0: 1}
    assert watch.failure(connection=False) == (
        "rendezvous at 10.0.0.1:29400 (id meshlm) timed out after 30 s: 1 of 2 nodes joined; start every node with the "
        "same --rdzv, --rdzv-id and --nodes")
    watch.completed = True
    assert "lost the rendezvous store after the job had started" in watch.failure(connection=True)


def test_slow_join_names_a_loopback_master(monkeypatch, capsys):
    for k, v in {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500", "GROUP_WORLD_SIZE": "2", "RANK": "2",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    timer = slow_join_warning(4, after_s=0.01)
    timer.join(5)
    err = capsys.readouterr().err
    assert err.startswith("meshlm: rank 2 has waited 0 s for the job's 4 ranks to connect through localhost:29500; "
                          "localhost is a loopback address in a job of 2 nodes")
    assert "--local-addr" in err


# --- scheduler files --------------------------------------------------------------------------------------

TRAIN = ["train", "--model", "llama-7b", "--layout.tp", "8", "--layout.pp", "2", "--layout.dp", "2",
         "--layout.micro_batches", "8", "--train.batch_size", "256"]


def test_sbatch_script_parses_and_runs_torchrun_with_the_rendezvous(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["launch", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--out", str(out),
                 "--", *TRAIN]) == 0
    assert "wrote the sbatch script" in capsys.readouterr().out
    text = out.read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(out)], check=True)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=24:00:00", 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "srun --kill-on-bad-exit=1 torchrun \\", "    --nnodes=4 \\", "    --nproc-per-node=8 \\",
                 "    --rdzv-backend=c10d \\", '    --rdzv-endpoint="${head_node}:${rdzv_port}" \\',
                 '    --rdzv-id="${SLURM_JOB_ID}" \\', "    -m meshlm train \\",
                 '    --train.out_dir "runs/${SLURM_JOB_ID}" \\', "    --layout.tp 8 \\",
                 "# 4 nodes x 8 GPUs, llama-7b: placement of pp2 x dp2 x tp8 (1f1b, 8 micro-batches) on 4 nodes of 8 "
                 "ranks: tp inside a node; dp, pp across nodes"):
        assert line in text.splitlines(), line
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert text.index(sbatch[-1]) < text.index("set -euo pipefail")  # every directive before the first command


def test_elastic_sbatch_script():
    text = sbatch_script(nodes="3:4", gpus_per_node=8, train_args=["--layout.tp", "8"])
    assert "    --nnodes=3:4 \\" in text and "--train.elastic true" in text and "--kill-on-bad-exit" not in text
    assert "#SBATCH --nodes=4" in text


def test_pytorchjob_manifest_is_a_kubeflow_pytorchjob(tmp_path):
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "job.yaml"
    assert main(["launch", "k8s", "--nodes", "4", "--gpus-per-node", "8", "--image", "ghcr.io/me/meshlm:1",
                 "--pvc", "runs", "--out", str(out), "--", *TRAIN]) == 0
    job = yaml.safe_load(out.read_text())
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("kubeflow.org/v1", "PyTorchJob", "meshlm")
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvPort": 29500, "rdzvId": "meshlm", "minReplicas": 4,
                                     "maxReplicas": 4, "maxRestarts": 0}
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "OnFailure"
    (c,) = worker["template"]["spec"]["containers"]
    assert c["name"] == "pytorch" and c["image"] == "ghcr.io/me/meshlm:1" and c["command"] == ["torchrun"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500}]
    args = c["args"]
    assert args[:7] == ["--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=meshlm-worker-0:29500", "--rdzv-id=meshlm",
                        "--rdzv-conf=join_timeout=600,read_timeout=600", "--max-restarts=0"]
    assert args[7:12] == ["-m", "meshlm", "train", "--train.out_dir", "/runs/meshlm"]
    assert args[12:] == TRAIN[1:]
    assert {"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}} in worker["template"]["spec"]["volumes"]
    elastic = yaml.safe_load(pytorchjob_manifest(nodes="2:4", gpus_per_node=8, train_args=["--layout.tp", "8"],
                                                 image="x"))
    assert elastic["spec"]["elasticPolicy"]["minReplicas"] == 2
    assert elastic["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"][0] == \
        "--nnodes=2:4"


def test_yaml_scalars_read_back_as_written():
    yaml = pytest.importorskip("yaml")
    values = {"a": ["3:4", "true", "8", "a: b", "-m", "--x=1,2", "", "null", "1e3", "#c", "x'y\"z", "0x1F", 7, True],
              "b": {"c": [], "d": {}, "e": [{"f": 1, "g": ["h"]}]}}
    assert yaml.safe_load(to_yaml(values)) == values
    assert json.loads(json.dumps(values)) == values


def test_launch_refuses_bad_input_in_one_line(capsys):
    cases = [
        (["k8s", "--nodes", "4", "--gpus-per-node", "8", "--", *TRAIN], "--image is required for k8s"),
        (["slurm", "--nodes", "4", "--gpus-per-node", "8", "--", "train", "--model", "llama-7b", "--layout.tp", "8"],
         "pp*dp*ep*cp*tp (8) must equal nodes x ranks per node (4 x 8 = 32)"),
        (["slurm", "--nodes", "x", "--gpus-per-node", "8"], "--nodes ('x') must be N or MIN:MAX"),
        (["slurm", "--nodes", "4", "--gpus-per-node", "0"], "--gpus-per-node (0) must be >= 1"),
        (["pbs", "--nodes", "4", "--gpus-per-node", "8"], "launch: argument scheduler: invalid choice: 'pbs'"),
        (["k8s", "--nodes", "4", "--gpus-per-node", "8", "--image", "x", "--job-name", "My_Job"],
         "--job-name ('My_Job') must be a Kubernetes name"),
        (["slurm", "--nodes", "4", "--gpus-per-node", "8", "--", "train", "--layout.tpp", "8"],
         "unknown setting 'layout.tpp' (did you mean layout.tp?)"),
    ]
    for argv, message in cases:
        assert main(["launch", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_launch_warns_when_tp_crosses_nodes(capsys):
    assert main(["launch", "slurm", "--nodes", "4", "--gpus-per-node", "8", "--", "--model", "llama-7b",
                 "--layout.tp", "16", "--layout.dp", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("meshlm: warning: tp (16) crosses nodes")
    assert "tp, dp across nodes" in captured.out

