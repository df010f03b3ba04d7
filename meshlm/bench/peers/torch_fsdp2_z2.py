"""Peer: FSDP2 with reshard_after_forward=False, the ZeRO-2-like setting of `fully_shard`.

Parameters stay gathered from a block's forward until its backward, so each is all-gathered once
per micro-batch (not twice); gradients are reduce-scattered as in ZeRO-2. The fair peer of `zero2`.
"""

from __future__ import annotations

from . import torch_fsdp2


class Peer(torch_fsdp2.Peer):
    name = "torch-fsdp2-z2"
    note = ("FSDP2 (reshard_after_forward=False) comm bytes are analytical (all_gather Psi, "
            "reduce_scatter Psi, x4 bytes), not measured")
    reshard = False
