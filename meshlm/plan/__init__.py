"""The planner: a hardware catalogue, a cost model of one training step, and a search over layouts.

    hardware.py   GPUs and clusters (peak FLOP/s, memory, link bandwidths and latencies)
    cost.py       predict(model, layout, ...) -> Prediction: step time, comm per axis, bubble, memory
    search.py     search(model, gpus=..., ...) -> every valid layout ranked by predicted step time
    cli.py        `meshlm plan`
"""

from .cost import Prediction, predict
from .hardware import GPU, Cluster, cluster, gpu_spec
from .search import SearchResult, search

__all__ = ["GPU", "Cluster", "Prediction", "SearchResult", "cluster", "gpu_spec", "predict", "search"]
