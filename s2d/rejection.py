"""Lossless verification of drafted tokens (Leviathan et al. 2023; Chen et al. 2023).

Greedy: accept the longest prefix equal to the target's argmax, then the target's next argmax.
Sampled: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample
from norm(max(0, p_i - q_i)); if all are accepted sample a bonus token from p_{k+1}. Either way the
output follows the target's own distribution exactly."""
from __future__ import annotations

import torch

from s2d.sampling import sample


def verify_greedy(drafts: list[int], target_logits: torch.Tensor) -> list[int]:
    """target_logits [k+1, V] -> the emitted tokens (accepted drafts + one target token)."""
    best = target_logits.argmax(-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return drafts[:n] + [best[n]]


def verify_sampled(drafts: list[int], q: torch.Tensor | None, p: torch.Tensor, gen) -> list[int]:
    """q [k, V] draft probabilities the drafts were sampled from, p [k+1, V] target probabilities."""
    if not torch.isfinite(p).all():  # NaN would pass the ratio test silently
        raise ValueError("the target's probabilities are not finite")
    k = len(drafts)
    if k:
        q = q.to(p.device)
        idx = torch.arange(k, device=p.device)
        x = torch.tensor(drafts, device=p.device)
        ratio = p[idx, x] / q[idx, x].clamp_min(1e-30)
        u = torch.rand(k, generator=gen, device=p.device)
        rejected = (u > ratio).nonzero()
        if len(rejected):
            n = int(rejected[0].item())
            residual = (p[n] - q[n]).clamp_min(0.0)
            total = residual.sum()
            # p == q at this position makes the residual empty; rejection then has probability 0
            dist = residual / total if total > 0 else p[n]
            return drafts[:n] + [sample(dist, gen)]
    return drafts + [sample(p[k], gen)]
