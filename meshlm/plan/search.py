"""Layout search: every valid layout of a model on a cluster, costed by `cost.predict`, ranked by step time.

Candidates (world = pp * dp * ep * cp * tp = gpus):

    tp    divisors of gpus_per_node (a tp group stays in a node) that layout.validate accepts
          (n_heads, n_kv_heads, d_ff); sequence parallelism on whenever tp > 1
    cp    1, 2, 4, 8 (the causal load-balanced split needs 2*cp to divide seq_len)
    ep    divisors of n_experts (mixture-of-experts models only)
    pp    divisors of n_layers; vpp 1, 2, 4 when pp > 1 (interleaved 1F1B when vpp > 1, else 1F1B)
    dp    gpus / (tp * cp * ep * pp), an integer
    zero  0, 1, 2, 3;  micro-batch 1, 2, 4, 8 dividing global_batch / (dp * ep);  recompute none,
          selective, full

Pruning. A 10,000-GPU search has tens of thousands of candidates. Each is first costed with the
closed-form pipeline time (`predict(simulate=False)`, which also gives the exact memory), and only the
best few (SIMULATE_TOP) that fit are costed again with the event simulation of their schedule
(cached by normalised (schedule, p, m, v, costs)) and re-ranked. Memory does not need the simulation.

When nothing fits, `smallest_cluster` looks for the smallest multiple of gpus_per_node on which some
layout fits (doubling, then bisection: memory per rank only falls as dp grows, through ZeRO), and
the result says what the least memory-hungry layout still needs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..config import ConfigError, ModelConfig, param_count
from ..layout import Layout, LayoutError, validate
from .cost import RECOMPUTE, Prediction, predict
from .hardware import Cluster, cluster

CP_DEGREES = (1, 2, 4, 8)
VPP_DEGREES = (1, 2, 4)
MICRO_BATCHES = (1, 2, 4, 8)
ZERO_STAGES = (0, 1, 2, 3)
SIMULATE_TOP = 40
"""Candidates re-costed with the schedule simulation after the closed-form screening."""
MAX_CLUSTER = 1 << 20


@dataclass
class SearchResult:
    ranked: list[Prediction]
    """The `top` fastest layouts that fit, fastest first."""
    rejected: list[tuple[Prediction, str]]
    """Layouts that do not fit in memory, least short first, with the reason."""
    considered: int = 0
    """Candidates costed (valid layouts)."""
    invalid: Counter = field(default_factory=Counter)
    """Combinations refused before costing, by reason."""
    smallest_cluster: int | None = None
    """When nothing fits: the smallest cluster (GPUs) on which some layout fits (None if not searched or none)."""
    why: str = ""
    """When nothing fits: what the least memory-hungry layout needs."""

    def __iter__(self):  # ranked, rejected = search(...)
        return iter((self.ranked, self.rejected))

    def summary(self) -> str:
        fits = self.considered - len(self.rejected)
        line = (f"{self.considered} layouts considered: {fits} fit, {len(self.rejected)} rejected for memory")
        if self.invalid:
            line += "; refused before costing: " + ", ".join(f"{n} ({why})" for why, n in self.invalid.most_common())
        return line


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_cluster(gpus: int, gpus_per_node: int) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus ({gpus!r}) must be a positive integer")
    if gpus % gpus_per_node:
        raise ConfigError(f"gpus ({gpus}) must be a multiple of gpus_per_node ({gpus_per_node})")


def candidates(model: ModelConfig, *, gpus: int, gpus_per_node: int, global_batch: int, seq_len: int,
               fixed: dict | None = None, invalid: Counter | None = None,
               recompute: tuple[str, ...] = RECOMPUTE, micro_batches: tuple[int, ...] = MICRO_BATCHES,
               zero: tuple[int, ...] = ZERO_STAGES):
    """Yield (layout, micro_batch, recompute) for every valid combination; count the refused in `invalid`."""
    fixed = fixed or {}
    invalid = invalid if invalid is not None else Counter()

    def allowed(name, values):
        return [fixed[name]] if name in fixed else list(values)

    experts = divisors(model.n_experts) if model.n_experts else [1]
    for tp in allowed("tp", [k for k in divisors(gpus_per_node) if gpus % k == 0]):
        try:
            validate(Layout(tp=tp), model)
        except LayoutError as e:
            invalid[f"tp {tp}: {_rule(e)}"] += 1
            continue
        for cp in allowed("cp", CP_DEGREES):
            if seq_len % (2 * cp if model.causal else cp) or (tp > 1 and seq_len % (cp * tp)):
                invalid[f"cp {cp}: does not split seq_len {seq_len}"] += 1
                continue
            for ep in allowed("ep", experts):
                for pp in allowed("pp", divisors(model.n_layers)):
                    rest = gpus // (tp * cp * ep) if gpus % (tp * cp * ep) == 0 else 0
                    if not rest or rest % pp:
                        continue
                    dp = rest // pp
                    if "dp" in fixed and fixed["dp"] != dp:
                        continue
                    if global_batch % (dp * ep):
                        invalid["global_batch not divisible by dp*ep"] += 1
                        continue
                    per_rank = global_batch // (dp * ep)
                    for vpp in allowed("vpp", VPP_DEGREES if pp > 1 else (1,)):
                        if vpp > 1 and (model.n_layers // pp) % vpp:
                            invalid["vpp does not divide the layers per stage"] += 1
                            continue
                        schedule = fixed.get("schedule") or ("interleaved" if vpp > 1 else "1f1b")
                        for b in allowed("micro_batch", micro_batches):
                            if per_rank % b:
                                continue
                            m = per_rank // b
                            if pp > 1 and schedule != "gpipe" and m < pp:
                                invalid["fewer micro-batches than pipeline stages"] += 1
                                continue
                            if schedule == "interleaved" and m % pp:
                                invalid["micro-batches not a multiple of pp (interleaved)"] += 1
                                continue
                            for z in allowed("zero", zero if dp * ep * cp > 1 else (0,)):
                                if pp > 1 and z >= 2 and "zero" not in fixed:
                                    invalid["ZeRO-2/3 under pp (whole gradients kept during the schedule: "
                                            "no saving over ZeRO-1)"] += 1
                                    continue
                                layout = Layout(dp=dp, tp=tp, pp=pp, ep=ep, cp=cp, zero=z, vpp=vpp,
                                                sequence_parallel=fixed.get("sequence_parallel", tp > 1),
                                                micro_batches=m, schedule=schedule)
                                for rc in allowed("recompute", fixed.get("recompute_modes", recompute)):
                                    yield layout, b, rc


def _rule(e: Exception) -> str:
    return str(e).split(") ", 1)[-1]


def _shortfall(pred: Prediction) -> str:
    need, have = pred.total_memory_bytes, pred.gpu_memory_bytes
    mem = pred.memory_bytes
    states = mem["params"] + mem["grads"] + mem["optim"]
    return (f"needs {need / 1e9:.1f} GB per GPU, {(need - have) / 1e9:.1f} GB more than the {have / 1e9:.0f} GB "
            f"(states {states / 1e9:.1f} GB, activations {mem['activations'] / 1e9:.1f} GB, "
            f"buffers {mem['buffers'] / 1e9:.1f} GB)")


def search(model: ModelConfig, *, gpus: int, gpu: str = "h100", gpus_per_node: int | None = None,
           global_batch: int, seq_len: int, precision: str = "bf16", top: int = 10, fixed: dict | None = None,
           attention: str = "flash", find_smallest: bool = True) -> SearchResult:
    """Rank every valid layout of `model` on `gpus` GPUs by predicted step time.

    Returns a SearchResult that unpacks as (ranked, rejected). `fixed` pins fields (tp, pp, dp, cp, ep,
    vpp, zero, micro_batch, recompute, schedule, sequence_parallel) and searches the rest.
    """
    net = cluster(gpu, gpus_per_node=gpus_per_node)
    check_cluster(gpus, net.gpus_per_node)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top ({top!r}) must be a positive integer")
    invalid: Counter = Counter()
    if attention == "flash" and not (fixed and "recompute" in fixed):
        fixed = {**(fixed or {}), "recompute_modes": ("none", "full")}  # selective saves nothing more under flash
    fitting: list[Prediction] = []
    rejected: list[tuple[Prediction, str]] = []
    considered = 0
    for layout, b, rc in candidates(model, gpus=gpus, gpus_per_node=net.gpus_per_node, global_batch=global_batch,
                                    seq_len=seq_len, fixed=fixed, invalid=invalid):
        try:
            pred = predict(model, layout, net=net, global_batch=global_batch, micro_batch=b, seq_len=seq_len,
                           precision=precision, recompute=rc, attention=attention, simulate=False)
        except ConfigError as e:
            invalid[str(e)] += 1
            continue
        considered += 1
        if pred.fits:
            fitting.append(pred)
        else:
            rejected.append((pred, _shortfall(pred)))
    fitting.sort(key=lambda r: (r.step_time_s, r.total_memory_bytes))
    exact = [predict(model, r.layout, net=net, global_batch=global_batch, micro_batch=r.micro_batch,
                     seq_len=seq_len, precision=precision, recompute=r.recompute, attention=attention, simulate=True)
             for r in fitting[:max(SIMULATE_TOP, top)]]
    exact.sort(key=lambda r: (r.step_time_s, r.total_memory_bytes))
    rejected.sort(key=lambda x: x[0].total_memory_bytes - x[0].gpu_memory_bytes)
    result = SearchResult(ranked=exact[:top], rejected=rejected, considered=considered, invalid=invalid)
    if not fitting and considered:
        least = rejected[0][0]
        result.why = (f"{min_states_note(model, gpus=gpus, gpus_per_node=net.gpus_per_node)}; the least "
                      f"memory-hungry layout ({_label(least)}) {rejected[0][1]}")
        if find_smallest:
            result.smallest_cluster = smallest_cluster(model, net=net, start=gpus, global_batch=global_batch,
                                                       seq_len=seq_len, precision=precision)
    return result


def _label(p: Prediction) -> str:
    return f"{p.layout.describe()}, micro-batch {p.micro_batch}, recompute {p.recompute}"


def fits_somewhere(model: ModelConfig, *, gpus: int, net: Cluster, global_batch: int, seq_len: int,
                   precision: str) -> bool:
    """Whether any layout fits memory on `gpus` GPUs (the memory-lean corner: recompute full, ZeRO 1 or 3)."""
    for layout, b, rc in candidates(model, gpus=gpus, gpus_per_node=net.gpus_per_node, global_batch=global_batch,
                                    seq_len=seq_len, recompute=("full",), micro_batches=(1,), zero=(1, 3)):
        pred = predict(model, layout, net=net, global_batch=global_batch, micro_batch=b, seq_len=seq_len,
                       precision=precision, recompute=rc, simulate=False)
        if pred.fits:
            return True
    return False


def smallest_cluster(model: ModelConfig, *, net: Cluster, start: int, global_batch: int, seq_len: int,
                     precision: str) -> int | None:
    """Smallest multiple of gpus_per_node above `start` on which some layout fits, or None up to MAX_CLUSTER.

    Doubles the node count until a layout fits, then bisects (memory per rank falls as dp grows).
    """
    gpn = net.gpus_per_node
    lo = max(1, start // gpn)  # nodes known (or assumed) too few
    hi = lo * 2
    while not fits_somewhere(model, gpus=hi * gpn, net=net, global_batch=global_batch, seq_len=seq_len,
                             precision=precision):
        lo, hi = hi, hi * 2
        if hi * gpn > MAX_CLUSTER:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_somewhere(model, gpus=mid * gpn, net=net, global_batch=global_batch, seq_len=seq_len,
                          precision=precision):
            hi = mid
        else:
            lo = mid
    return hi * gpn


def min_states_note(model: ModelConfig, *, gpus: int, gpus_per_node: int) -> str:
    """'parameters alone need X GB per GPU at tp*pp <= N' (18 bytes/param, no ZeRO sharding)."""
    shards = gpus_per_node * model.n_layers
    psi = param_count(model)["total"]
    return f"parameters alone need {18 * psi / min(shards, gpus) / 1e9:.1f} GB per GPU at tp*pp <= {min(shards, gpus)}"


__all__ = ["SearchResult", "search", "smallest_cluster", "candidates", "divisors", "check_cluster"]
