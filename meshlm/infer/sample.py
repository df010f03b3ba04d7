"""Single-process sampling: greedy, temperature and top-k, by re-running the model on the window.

No KV cache yet: each new token re-encodes the last max_seq_len tokens. That is O(T^2) per token
but exact and simple; cached, parallel generation builds on this later.
"""

from __future__ import annotations

import torch

from ..model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, stop: set[int] | None = None) -> list[int]:
    """Continue `prompt`; temperature 0 is greedy. Returns only the new tokens (stops after a stop token)."""
    if model.cfg.family == "bert":
        raise ValueError("generation needs a decoder (gpt or llama); this checkpoint is a bert model")
    if not prompt:
        raise ValueError("the prompt encodes to no tokens")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.cfg.max_seq_len:])[0, -1].float()  # (V,)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        new.append(nxt)
        if stop and nxt in stop:
            break
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=device)], dim=1)
    return new
