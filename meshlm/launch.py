"""Starting the processes of a job: PyTorch's own elastic launcher, never a launcher of our own.

    one machine    `meshlm train ...` re-launches itself through torch.distributed.run with one process
                   per rank of the layout, as `torchrun --standalone --nproc-per-node N -m meshlm train`.
    many machines  `meshlm train --nodes 2 --node-rank R --rdzv HOST:PORT ...` on every node, which is
                   `torchrun --nnodes 2 --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT
                   -m meshlm train ...`; torchrun's c10d rendezvous gathers the nodes, numbers them and
                   their ranks (each node's ranks contiguous), and restarts the group when a rank dies.
    under torchrun `torchrun ... -m meshlm train ...` (SLURM, Kubernetes) simply joins the job it is in.
    schedulers     `meshlm launch slurm|k8s` writes an sbatch script or a Kubeflow PyTorchJob that runs
                   torchrun on every node (`sbatch_script`, `pytorchjob_manifest`); never submitted by us.

At the start of a run every rank calls `join_job`: under an elastic node count (`--nodes MIN:MAX`,
train.elastic) dp is refitted to the world that joined (`fit_layout`); every node must have been started
with the same settings (`settings_mismatch` names the node that was not); and rank 0 prints which node
each rank is on and warns when tp, cp or ep groups cross nodes (`meshlm.mesh.Placement`).

The rendezvous is torchrun's c10d store, hosted by the node started with --node-rank 0 (the machine of
--rdzv HOST). It must stay up for the whole job: losing another node is survived under --nodes MIN:MAX
with --max-restarts, losing the host is not (with torchrun's etcd rendezvous the store lives outside the nodes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shlex
import socket
import sys
import threading
from dataclasses import dataclass

from .config import ConfigError
from .layout import Layout, LayoutError


def under_torchrun() -> bool:
    """True inside a process started by torchrun / torch.distributed.run (or another launcher that sets RANK)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def launch_local(nproc: int, argv: list[str], *, threads: int = 0, module: str = "meshlm",
                 max_restarts: int = 0) -> int:
    """Run `python -m MODULE ARGV` as nproc local processes via torch.distributed.run; return an exit code.

    max_restarts: when a worker dies, the elastic agent stops the others and starts the whole group
    again, up to this many times (TORCHELASTIC_RESTART_COUNT tells the workers which attempt it is).
    """
    from torch.distributed.run import get_args_parser

    _share_cores(nproc, threads)
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "--module", module, *argv]
    )
    return _run_torchrun(args)


def _share_cores(nproc: int, threads: int) -> None:
    # torchrun would set OMP_NUM_THREADS=1 with a warning; share the cores out ourselves instead.
    per_proc = threads or max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_proc))


def _run_torchrun(args, spec: "NodeSpec | None" = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (RendezvousConnectionError, RendezvousError,
                                                          RendezvousTimeoutError)
    from torch.distributed.run import run

    watch = RendezvousWatch(spec) if spec is not None else None
    if watch is not None:
        watch.start()
    try:
        run(args)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {r} (exit {f.exitcode})" for r, f in sorted(e.failures.items()))
        print(f"meshlm: error: {failed} failed; the first error is printed above", file=sys.stderr)
        return 2 if e.get_first_failure()[1].exitcode == 2 else 1  # 2: a rank refused bad input
    except (RendezvousTimeoutError, RendezvousConnectionError) as e:
        if watch is None:
            raise
        print(f"meshlm: error: {watch.failure(connection=isinstance(e, RendezvousConnectionError))}", file=sys.stderr)
        return 1
    except RendezvousError as e:
        if spec is None:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"meshlm: error: rendezvous at {spec.rdzv} failed: {first}", file=sys.stderr)
        return 1
    finally:
        if watch is not None:
            watch.stop()
    return 0


# --- several nodes ---------------------------------------------------------------------------------

NODE_FLAGS = ("--nodes", "--node-rank", "--rdzv", "--rdzv-id", "--rdzv-timeout", "--rdzv-conf", "--nproc-per-node",
              "--local-addr")
"""`meshlm train` flags that start a multi-node job (the launcher's, not settings)."""

NODE_FLAGS_HELP = """\
--nodes N | MIN:MAX   run over N machines (or elastically between MIN and MAX), joined by torchrun's c10d rendezvous;
                      run the same command on every node (only --node-rank differs)
--rdzv HOST:PORT      the rendezvous endpoint: an address of the node started with --node-rank 0, a free port
--node-rank R         0 on the node that hosts the rendezvous store (the machine of --rdzv HOST), 1.. elsewhere;
                      torchrun numbers the nodes itself (GROUP_RANK), each node's ranks contiguous
--nproc-per-node K    ranks per node (default: the layout's world size / the most nodes)
--rdzv-id ID          the job's name in the rendezvous, the same on every node (default meshlm)
--rdzv-timeout S      give up when the nodes have not all joined within S seconds (default 600)
--rdzv-conf K=V,...   more of torchrun's c10d settings (last_call_timeout, keep_alive_interval, ...)
--local-addr ADDR     this node's address as the others reach it (default: its host name, which must not resolve
                      to a loopback address); with gloo, GLOO_SOCKET_IFNAME names the interface the ranks use
Under --nodes MIN:MAX, dp is refitted to the ranks that joined (train.elastic): tp, pp, cp, ep and the global
batch stay, and a lost node (not the rendezvous host) restarts the job from its newest checkpoint (--max-restarts).
train.out_dir must be given and lie on a filesystem every node sees."""


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """How this node joins a multi-node job (`meshlm train --nodes ...`)."""

    min_nodes: int
    max_nodes: int
    rdzv: str = ""
    """HOST:PORT of torchrun's c10d rendezvous store."""
    node_rank: int | None = None
    """0 hosts the rendezvous store; others connect to it; None lets torchrun guess from the host name."""
    rdzv_id: str = "meshlm"
    rdzv_timeout: float = 600.0
    rdzv_conf: str = ""
    nproc_per_node: int | None = None
    local_addr: str = ""
    """This node's address as the other nodes reach it (torchrun --local-addr); empty: its host name."""

    @property
    def elastic(self) -> bool:
        return self.min_nodes < self.max_nodes

    @property
    def nnodes(self) -> str:
        return f"{self.min_nodes}:{self.max_nodes}" if self.elastic else str(self.max_nodes)

    def conf(self) -> dict[str, str]:
        """The --rdzv-conf given to torchrun: the timeouts, the store host, then the user's own keys."""
        t = f"{self.rdzv_timeout:g}"
        conf = {"join_timeout": t, "read_timeout": t}  # read_timeout: how long a node waits for the store host
        if self.node_rank is not None:
            conf["is_host"] = "true" if self.node_rank == 0 else "false"
        conf.update(parse_conf(self.rdzv_conf))
        return conf

    def nproc(self, layout: Layout) -> int:
        """Ranks per node: given, or the layout's world size over the most nodes."""
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        if layout.world_size % self.max_nodes:
            raise ConfigError(f"--nodes ({self.nnodes}): the layout's world size ({layout.world_size}) must be a "
                              f"multiple of the most nodes ({self.max_nodes}); or give --nproc-per-node")
        return layout.world_size // self.max_nodes


def parse_nodes(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1:2' -> (1, 2)."""
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise ConfigError(f"--nodes ({text!r}) must be N or MIN:MAX with 1 <= MIN <= MAX")
    return lo, hi


def parse_endpoint(text: str, flag: str = "--rdzv") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{flag} ({text!r}) must be HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def parse_conf(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--rdzv-conf ({text!r}) must be KEY=VALUE[,KEY=VALUE...]")
        out[key.strip()] = value.strip()
    return out


def parse_node_flags(argv: list[str]) -> tuple[NodeSpec | None, list[str]]:
    """Take NODE_FLAGS (`--flag VALUE` or `--flag=VALUE`) out of argv: (NodeSpec or None, the rest). Pure."""
    from .settings import take_flags

    found, rest = take_flags(argv, NODE_FLAGS)
    if not found:
        return None, rest
    if "--nodes" not in found:
        raise ConfigError(f"{next(iter(found))} needs --nodes N (the number of machines of the job)")
    lo, hi = parse_nodes(found["--nodes"])
    if "--rdzv" in found:
        parse_endpoint(found["--rdzv"])
    elif hi > 1:
        raise ConfigError(f"--nodes ({found['--nodes']}) needs --rdzv HOST:PORT, the rendezvous endpoint given to "
                          "every node (an address of the node started with --node-rank 0)")

    def integer(flag: str, low: int) -> int | None:
        if flag not in found:
            return None
        v = found[flag]
        if not v.isdigit() or int(v) < low:
            raise ConfigError(f"{flag} ({v!r}) must be an integer >= {low}")
        return int(v)

    node_rank = integer("--node-rank", 0)
    if node_rank is not None and node_rank >= hi:
        raise ConfigError(f"--node-rank ({node_rank}) must be below the most nodes ({hi})")
    timeout = found.get("--rdzv-timeout", "600")
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"--rdzv-timeout ({timeout!r}) must be a positive number of seconds")
    rdzv_id = found.get("--rdzv-id", "meshlm")
    if not rdzv_id or any(c.isspace() for c in rdzv_id):
        raise ConfigError(f"--rdzv-id ({rdzv_id!r}) must be a non-empty name without spaces")
    parse_conf(found.get("--rdzv-conf", ""))
    spec = NodeSpec(min_nodes=lo, max_nodes=hi, rdzv=found.get("--rdzv", ""), node_rank=node_rank, rdzv_id=rdzv_id,
                    rdzv_timeout=seconds, rdzv_conf=found.get("--rdzv-conf", ""),
                    nproc_per_node=integer("--nproc-per-node", 1), local_addr=found.get("--local-addr", ""))
    return spec, rest


def check_node_counts(spec: NodeSpec, layout: Layout, nproc: int, *, model=None, batch_size: int | None = None,
                      seq_len: int | None = None) -> None:
    """Every node count the job may run at must fit the layout (dp refitted when elastic). Pure."""
    from .layout import validate

    if not spec.elastic:
        world = spec.max_nodes * nproc
        if world != layout.world_size:
            raise LayoutError(f"product of degrees pp*dp*ep*cp*tp ({layout.world_size}) must equal nodes x ranks per "
                              f"node ({spec.max_nodes} x {nproc} = {world})")
        return
    for n in range(spec.min_nodes, spec.max_nodes + 1):
        try:
            fitted = fit_layout(layout, n * nproc)
            if model is not None:
                validate(fitted, model, n * nproc, batch_size=batch_size, seq_len=seq_len)
        except LayoutError as e:
            raise LayoutError(f"--nodes {spec.nnodes}: at {n} node{'s' if n > 1 else ''} ({n * nproc} ranks): {e}") \
                from None


def fit_layout(layout: Layout, world: int) -> Layout:
    """The elastic rule: keep pp, ep, cp, tp; dp = world / (pp*ep*cp*tp). Pure; LayoutError when it cannot."""
    rest = layout.world_size // layout.dp
    if world < rest or world % rest:
        raise LayoutError(f"world size ({world}) must be a multiple of pp*ep*cp*tp ({rest}) to refit dp to it "
                          "(train.elastic keeps the other degrees)")
    return layout.replace(dp=world // rest)


NO_SHARED_STORE = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
"""Workers bootstrap from a store of their own (on rank 0) rather than the rendezvous store the agents share: with
the shared store, torch (2.4 - 2.13 at least) never publishes the workers' address for a node that joins in a
later round (an elastic scale-up, a node that comes back), which then waits for it until its read timeout."""


def launch_nodes(spec: NodeSpec, nproc: int, argv: list[str], *, threads: int = 0, module: str = "meshlm",
                 max_restarts: int = 0) -> int:
    """This node's part of a multi-node job: torch.distributed.run with the c10d rendezvous; an exit code."""
    from torch.distributed.run import get_args_parser

    _share_cores(nproc, threads)
    os.environ.setdefault(*NO_SHARED_STORE)
    if spec.node_rank is not None:  # these two only name the node in messages
        os.environ["MESHLM_NODE_RANK"] = str(spec.node_rank)
    if spec.local_addr:
        os.environ["MESHLM_NODE_ADDR"] = spec.local_addr
    conf = ",".join(f"{k}={v}" for k, v in spec.conf().items())
    args = get_args_parser().parse_args(
        [f"--nnodes={spec.nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
         f"--rdzv-endpoint={spec.rdzv}", f"--rdzv-id={spec.rdzv_id}", f"--rdzv-conf={conf}",
         f"--max-restarts={max_restarts}", *([f"--local-addr={spec.local_addr}"] if spec.local_addr else []),
         "--module", module, *argv])
    return _run_torchrun(args, spec)


class RendezvousWatch(threading.Thread):
    """Follows the rendezvous from this node's launcher, so that a timeout can say how many nodes joined.

    It reads the rendezvous state torchrun keeps in the c10d store at the endpoint (the round, and its
    participants and waiting nodes, pickled by torch itself), every second until the job has started and
    every 10 s after; it never writes.
    """

    def __init__(self, spec: NodeSpec):
        super().__init__(name="meshlm-rendezvous-watch", daemon=True)
        self.spec = spec
        self.answered = False
        self.completed = False
        """A round completed: the workers were started (a later store error is not a failure to join)."""
        self.rounds: dict[int, int] = {}
        """The most nodes seen in each round (a node that times out leaves the round before it says so)."""
        self._done = threading.Event()

    @property
    def joined(self) -> int:
        return self.rounds[max(self.rounds)] if self.rounds else 0

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():  # a store call cut off by the interpreter's exit would abort the process
            self.join(timeout=10)

    def run(self) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        host, port = parse_endpoint(self.spec.rdzv)
        key = f"torch.rendezvous.{self.spec.rdzv_id}"
        while not self._done.wait(10.0 if self.completed else 1.0):  # while running, rarely: one connection each
            try:  # a plain connection first: a store client that cannot connect logs a stack trace
                socket.create_connection((host, port), timeout=1).close()
                store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=2),
                                      wait_for_workers=False)
                self.answered = True
                if store.check([key]):
                    seen = _round_nodes(store.get(key))
                    if seen is not None:
                        self.rounds[seen[0]] = max(self.rounds.get(seen[0], 0), seen[1])
                        self.completed |= seen[2]
                del store
            except Exception:  # noqa: BLE001 - not up yet, or gone: keep what was seen
                pass

    def failure(self, *, connection: bool) -> str:
        s = self.spec
        need = f"at least {s.min_nodes}" if s.elastic else str(s.min_nodes)
        if connection and self.completed:
            return (f"rendezvous at {s.rdzv}: lost the rendezvous store after the job had started (the node with "
                    "--node-rank 0, which hosts it, exited or is unreachable); the first error is printed above")
        if connection or not self.answered:
            return (f"rendezvous at {s.rdzv}: no rendezvous store answered within {s.rdzv_timeout:g} s (0 of {need} "
                    f"nodes joined); start the node with --node-rank 0 on that host, or check the address and port")
        return (f"rendezvous at {s.rdzv} (id {s.rdzv_id}) timed out after {s.rdzv_timeout:g} s: {self.joined} of "
                f"{need} nodes joined; start every node with the same --rdzv, --rdzv-id and --nodes")


def _round_nodes(raw: bytes) -> tuple[int, int, bool] | None:
    """(round, nodes in it (participants and waiting), complete) of a c10d rendezvous state; None if unreadable."""
    import base64
    import pickle
    try:
        state = pickle.loads(base64.b64decode(raw))  # torch's own _RendezvousState, as its rendezvous reads it
        return state.round, len(state.participants) + len(state.wait_list), bool(state.complete)
    except Exception:  # noqa: BLE001 - the empty sentinel, or another torch's format
        return None


# --- the start of a run: every rank ------------------------------------------------------------------

NODE_LOCAL_SETTINGS = ("data.path", "train.threads", "train.progress", "train.tensorboard")
"""Settings that may differ between nodes (a dataset's local path, the node's cores, rank 0's console)."""


def run_settings(cfg, dataset=None) -> dict[str, object]:
    """The settings every node must agree on, flattened ('layout.tp': 2, ...), with the data's fingerprint."""
    d = cfg.to_dict()
    flat: dict[str, object] = {"model.preset": d.pop("preset")}
    for section, fields in d.items():
        flat.update({f"{section}.{k}": v for k, v in fields.items()})
    for key in NODE_LOCAL_SETTINGS:
        flat.pop(key, None)
    if dataset is not None:  # the same path may hold other tokens on another machine
        head = bytes(memoryview(dataset.train[:4096]))
        flat["data (tokens)"] = (f"vocab {dataset.vocab_size}, {len(dataset.train)} + {len(dataset.val)} tokens, "
                                 f"sha256 of the first 4096 {hashlib.sha256(head).hexdigest()[:12]}")
    return flat


def settings_digest(settings: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class RankInfo:
    """What each rank reports at the start: its node, the node's host, and the digest of its settings."""

    node: str
    """torchrun's GROUP_RANK, or the host name under another launcher."""
    host: str
    digest: str
    node_flag: str = ""
    """This node's --node-rank, when it was started with one."""


def this_rank_info(digest: str) -> RankInfo:
    host = socket.gethostname()
    addr = os.environ.get("MESHLM_NODE_ADDR", "")
    return RankInfo(node=os.environ.get("GROUP_RANK", host), host=f"{host} ({addr})" if addr else host, digest=digest,
                    node_flag=os.environ.get("MESHLM_NODE_RANK", ""))


def node_numbers(infos: list[RankInfo]) -> list[int]:
    """Node index of every rank: torchrun's GROUP_RANK order (first appearance otherwise)."""
    keys = list(dict.fromkeys(i.node for i in infos))
    if all(k.isdigit() for k in keys):
        keys.sort(key=int)
    index = {k: n for n, k in enumerate(keys)}
    return [index[i.node] for i in infos]


def describe_node(infos: list[RankInfo], nodes: list[int], node: int) -> str:
    ranks = [r for r, n in enumerate(nodes) if n == node]
    first = infos[ranks[0]]
    span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    flag = f", --node-rank {first.node_flag}" if first.node_flag else ""
    return f"node {node} (host {first.host}{flag}, {span})"


def settings_mismatch(infos: list[RankInfo], settings: list[dict[str, object]] | None = None) -> str | None:
    """None when every rank has rank 0's digest; else one line naming the first node that differs and how. Pure.

    `settings` (every rank's run_settings) names the fields; without it only the node is named.
    """
    odd = next((r for r, i in enumerate(infos) if i.digest != infos[0].digest), None)
    if odd is None:
        return None
    nodes = node_numbers(infos)
    theirs, ours = describe_node(infos, nodes, nodes[odd]), describe_node(infos, nodes, nodes[0])
    if any(i.digest != infos[odd].digest for i, n in zip(infos, nodes) if n == nodes[odd]):  # not the whole node
        theirs = f"rank {odd} on {theirs}"
    what = ""
    if settings is not None:
        a, b = settings[0], settings[odd]
        diffs = [f"{k} {b.get(k)!r} (node {nodes[0]}: {a.get(k)!r})" for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k)]
        what = ": " + ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    hint = "; start every node with the same settings"
    if settings is not None and settings[0].get("train.out_dir") != settings[odd].get("train.out_dir"):
        hint += " (give --train.out_dir a folder every node sees)"
    return f"{theirs} was started with other settings than {ours}{what}{hint}"


def agree_on_settings(cfg, dataset=None, *, info: RankInfo | None = None):
    """Collective over the job: gather every rank's node and settings digest; ConfigError on every rank naming
    the node whose settings differ from rank 0's; else the job's Placement (hosts included)."""
    import torch.distributed as dist

    from .mesh import Placement

    mine = run_settings(cfg, dataset)
    info = info or this_rank_info(settings_digest(mine))
    infos: list = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    if any(i.digest != infos[0].digest for i in infos):
        every: list = [None] * len(infos)
        dist.all_gather_object(every, mine)  # only on a mismatch: to name the fields
        raise ConfigError(settings_mismatch(infos, every))
    nodes = node_numbers(infos)
    hosts = tuple(infos[nodes.index(n)].host for n in range(max(nodes) + 1))
    return Placement(cfg.layout, tuple(nodes), hosts)


def join_job(cfg, *, world: int, dataset=None):
    """The start of a run, on every rank after init_process_group; returns the run's config.

    Elastic (train.elastic): dp refitted to the world that joined, and the run resumes from out_dir's newest
    checkpoint when there is one (after a lost node or a node that joins). Several ranks: every node's settings
    compared with rank 0's (a node started with another model, layout or data ends the run with one line
    naming it, printed once per node); rank 0 prints the rank-to-node placement and a warning for each
    of tp, cp, ep whose groups cross nodes.
    """
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)  # noqa: E731
    lay = cfg.layout
    if lay.world_size != world:
        if not cfg.train.elastic:
            raise LayoutError(f"product of degrees pp*dp*ep*cp*tp ({lay.world_size}) must equal the world size "
                              f"({world}) (under an elastic node count, train.elastic true refits dp)")
        fitted = fit_layout(lay, world)
        say(f"meshlm: elastic: {world} ranks joined; layout.dp {lay.dp} -> {fitted.dp} ({fitted.describe()}), "
            f"global batch {cfg.train.batch_size} unchanged")
        cfg = dataclasses.replace(cfg, layout=fitted)
    if cfg.train.elastic and not cfg.train.resume:
        from pathlib import Path

        from .train.checkpoint import list_checkpoints
        if list_checkpoints(Path(cfg.train.out_dir) / "ckpt"):  # also after a change of membership, which
            # torchrun does not count as a restart (TORCHELASTIC_RESTART_COUNT stays)
            if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":  # a restart says so itself
                say(f"meshlm: elastic: resuming from the newest checkpoint in {cfg.train.out_dir}")
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
    if world == 1:
        return cfg
    try:
        placement = agree_on_settings(cfg, dataset)
    except ConfigError:
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            raise SystemExit(2) from None  # the node's first rank says why, once
        raise
    if placement.n_nodes > 1:
        say(f"meshlm: {placement.describe()}\n{placement.table()}")
        if rank == 0:
            for line in placement.warnings():
                print(f"meshlm: warning: {line}", file=sys.stderr, flush=True)
    return cfg


def slow_join_warning(world: int, *, after_s: float = 60.0) -> threading.Timer:
    """A started timer that prints one line (the node's first rank) when init_process_group still waits after
    `after_s`: where it waits, and why when the address is a loopback one in a job of several nodes."""
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))

    def say() -> None:
        why = ""
        try:
            loopback = ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
        except (OSError, ValueError):
            loopback = False
        if loopback and nodes > 1:
            why = (f"; {addr} is a loopback address in a job of {nodes} nodes, so ranks on other machines cannot "
                   "reach it: give each node --local-addr (torchrun --local-addr), its address as the others see it")
        print(f"meshlm: rank {os.environ.get('RANK', '?')} has waited {after_s:.0f} s for the job's {world} ranks to "
              f"connect through {addr}:{port}{why}", file=sys.stderr, flush=True)

    timer = threading.Timer(after_s, say)
    timer.daemon = True
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        timer.start()
    return timer


# --- schedulers: the files, never submitted ----------------------------------------------------------

def _train_argv(train_args: list[str]) -> list[str]:
    return train_args[1:] if train_args[:1] == ["train"] else list(train_args)


def _has(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _arg_lines(args: list[str]) -> list[str]:
    """Group '--flag value' pairs, one per line."""
    lines, i = [], 0
    while i < len(args):
        if args[i].startswith("--") and "=" not in args[i] and i + 1 < len(args) and not args[i + 1].startswith("--"):
            lines.append(f"{shlex.quote(args[i])} {shlex.quote(args[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(args[i]))
            i += 1
    return lines


def sbatch_script(*, nodes: str, gpus_per_node: int, train_args: list[str], job_name: str = "meshlm",
                  port: int = 29500, time_limit: str = "", partition: str = "", account: str = "",
                  cpus_per_task: int = 0, max_restarts: int = 0, rdzv_timeout: float = 600.0,
                  header: list[str] = ()) -> str:
    """An sbatch script: one srun task per node runs torchrun, which starts the node's ranks; the nodes meet
    at torchrun's c10d rendezvous on the allocation's first node. Pure (text)."""
    lo, hi = parse_nodes(nodes)
    args = _train_argv(train_args)
    if hi > lo and not _has(args, "--train.elastic"):
        args += ["--train.elastic", "true"]
    out_dir = [] if _has(args, "--train.out_dir") else ['--train.out_dir "runs/${SLURM_JOB_ID}"']
    sbatch = [f"--job-name={job_name}", f"--nodes={hi}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}"]
    sbatch += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    sbatch += [f"--time={time_limit}"] if time_limit else []
    sbatch += [f"--partition={partition}"] if partition else []
    sbatch += [f"--account={account}"] if account else []
    sbatch += ["--output=%x-%j.out"]
    torchrun = [f"--nnodes={lo}:{hi}" if hi > lo else f"--nnodes={hi}", f"--nproc-per-node={gpus_per_node}",
                "--rdzv-backend=c10d", '--rdzv-endpoint="${head_node}:${rdzv_port}"', '--rdzv-id="${SLURM_JOB_ID}"',
                f"--rdzv-conf=join_timeout={rdzv_timeout:g},read_timeout={rdzv_timeout:g}",
                f"--max-restarts={max_restarts}", "-m meshlm train"]
    body = torchrun + out_dir + _arg_lines(args)
    lines = ["#!/bin/bash",
             "# meshlm training job for SLURM, written by `meshlm launch slurm`; submit it with `sbatch THIS_FILE`",
             "# (meshlm never submits anything).", *[f"# {h}" for h in header], "#",
             "# One task per node runs torchrun, which starts that node's ranks (each node's ranks numbered",
             "# contiguously); the nodes meet at torchrun's c10d rendezvous, hosted on the first node of the",
             "# allocation. train.out_dir must lie on a filesystem every node sees (the ranks write checkpoint",
             "# pieces there)." + (" Elastic: a lost node other than the first restarts the job from its newest"
                                   " checkpoint at the smaller size." if hi > lo else ""),
             *[f"#SBATCH {s}" for s in sbatch], "",
             "set -euo pipefail", "",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f"rdzv_port={port}"]
    lines.append(f"export {NO_SHARED_STORE[0]}={NO_SHARED_STORE[1]}  # a node joining a later round would wait forever")
    if cpus_per_task:
        lines.append(f"export OMP_NUM_THREADS={max(1, cpus_per_task // gpus_per_node)}  # the task's cores per rank")
    lines += ["# export NCCL_SOCKET_IFNAME=ib0   # name the interface when the nodes have several networks", "",
              "srun " + ("" if hi > lo else "--kill-on-bad-exit=1 ") + "torchrun \\"]
    lines += [f"    {part} \\" for part in body[:-1]] + [f"    {body[-1]}", ""]
    return "\n".join(lines)


def pytorchjob_manifest(*, nodes: str, gpus_per_node: int, train_args: list[str], image: str, name: str = "meshlm",
                        namespace: str = "", port: int = 29500, pvc: str = "", max_restarts: int = 0,
                        rdzv_timeout: float = 600.0, header: list[str] = ()) -> str:
    """A Kubeflow Training Operator PyTorchJob (kubeflow.org/v1): one Worker pod per node runs torchrun with the
    c10d rendezvous on pod worker-0 (its service NAME-worker-0). Pure (YAML text)."""
    lo, hi = parse_nodes(nodes)
    args = _train_argv(train_args)
    if hi > lo and not _has(args, "--train.elastic"):
        args += ["--train.elastic", "true"]
    if not _has(args, "--train.out_dir"):
        args = ["--train.out_dir", f"/runs/{name}" if pvc else f"runs/{name}"] + args
    container = {
        "name": "pytorch",  # the operator finds the container and its port by these names
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["torchrun"],
        "args": [f"--nnodes={lo}:{hi}" if hi > lo else f"--nnodes={hi}", f"--nproc-per-node={gpus_per_node}",
                 "--rdzv-backend=c10d", f"--rdzv-endpoint={name}-worker-0:{port}", f"--rdzv-id={name}",
                 f"--rdzv-conf=join_timeout={rdzv_timeout:g},read_timeout={rdzv_timeout:g}",
                 f"--max-restarts={max_restarts}", "-m", "meshlm", "train", *args],
        "env": [{"name": NO_SHARED_STORE[0], "value": NO_SHARED_STORE[1]}],  # see meshlm/launch.py
        "ports": [{"name": "pytorchjob-port", "containerPort": port}],
        "resources": {"limits": {"nvidia.com/gpu": gpus_per_node}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]
                        + ([{"name": "runs", "mountPath": "/runs"}] if pvc else []),
    }
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}] + \
        ([{"name": "runs", "persistentVolumeClaim": {"claimName": pvc}}] if pvc else [])
    metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(gpus_per_node),
            "elasticPolicy": {"rdzvBackend": "c10d", "rdzvPort": port, "rdzvId": name, "minReplicas": lo,
                              "maxReplicas": hi, "maxRestarts": max_restarts},
            "pytorchReplicaSpecs": {"Worker": {"replicas": hi, "restartPolicy": "OnFailure",
                                               "template": {"spec": {"containers": [container],
                                                                     "volumes": volumes}}}},
        },
    }
    head = ["meshlm training job for Kubernetes (a Kubeflow Training Operator PyTorchJob), written by",
            "`meshlm launch k8s`; apply it with `kubectl apply -f THIS_FILE` (meshlm never submits anything).",
            *header,
            "Each Worker pod runs torchrun, which starts that pod's ranks; the pods meet at torchrun's c10d",
            f"rendezvous on pod {name}-worker-0. train.out_dir must lie on a volume every pod mounts"
            + (f" (PVC {pvc} at /runs)." if pvc else " (give --pvc CLAIM).")]
    return "".join(f"# {h}\n" for h in head) + to_yaml(job)


_PLAIN = re.compile(r"[A-Za-z0-9_./=:-]+")
_YAML_WORDS = ("true", "false", "yes", "no", "on", "off", "null", "y", "n")


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    s = str(v)
    plain = (_PLAIN.fullmatch(s) and not re.match(r"[-+.]?[0-9]", s)  # numbers (YAML 1.1 also reads 3:4, 0x1F)
             and s[0] not in ":." and not s.endswith(":") and s.lower() not in _YAML_WORDS)
    return s if plain else json.dumps(s)  # a JSON string is a YAML double-quoted scalar


def to_yaml(obj, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars, enough for a manifest (and no dependency). Pure."""
    pad = " " * indent
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{_scalar(k)}:\n{to_yaml(v, indent + 2)}")
            else:
                out.append(f"{pad}{_scalar(k)}: {_flow(v)}\n")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)) and v:
                inner = to_yaml(v, indent + 2)
                out.append(f"{pad}- {inner[indent + 2:]}")  # the first entry on the dash's line
            else:
                out.append(f"{pad}- {_flow(v)}\n")
    else:
        out.append(f"{pad}{_flow(obj)}\n")
    return "".join(out)


def _flow(v) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return _scalar(v)
