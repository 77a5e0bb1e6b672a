"""The distribution a request samples from: temperature, then top-k, then top-p. Draft and target
use the same function so the rejection sampler compares like with like."""
from __future__ import annotations

import torch

from s2d.core.config import SamplingParams


def probs_from_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] (fp32) of sampling with params p (not greedy)."""
    logits = logits.float() / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """One draw from probs [V] with the generator (`draw`)."""
    return int(draw(probs[None], exponentials(probs.shape[-1], gen, probs.device)[None])[0])


def exponentials(n: int, gen: torch.Generator | None, device) -> torch.Tensor:
    """[n] Exp(1) noise from one request's generator: its draws stay its own, whatever the batch."""
    return torch.empty(n, device=device).exponential_(generator=gen)


def draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draws for a batch by the exponential race: probs [S, V] (unnormalised is fine), noise [S, V]
    Exp(1) -> [S] token ids, argmax(p / e), which picks token i with probability p_i / sum(p). A
    zero-probability token never wins (0 / e = 0), on any device and in any summation order. One
    division and one argmax for all rows, where torch.multinomial draws a row at a time."""
    return (probs / noise).argmax(-1)


def generator(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed % (2**63))
