"""Lossless verification of drafted tokens (Leviathan et al. 2023; Chen et al. 2023).

Greedy: accept the longest prefix equal to the target's argmax, then the target's next argmax.
Sampled: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample
from norm(max(0, p_i - q_i)); if all are accepted sample a bonus token from p_{k+1}. Either way the
output follows the target's own distribution exactly.

`verify_batch` runs the rule over a whole ragged batch in tensor ops with one copy to the host at
the end, as vLLM's rejection sampler does; `verify_greedy` and `verify_sampled` are the same rule
for one sequence, kept as the reference the batched sampler is tested against."""
from __future__ import annotations

import torch

from s2d.sampling import sample


def verify_greedy(drafts: list[int], target_logits: torch.Tensor) -> list[int]:
    """target_logits [k+1, V] -> the emitted tokens (accepted drafts + one target token)."""
    return accept_prefix(drafts, target_logits.argmax(-1).tolist())


def accept_prefix(drafts: list[int], best: list[int]) -> list[int]:
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return drafts[:n] + [best[n]]


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[V] what to sample from at a rejection: norm(max(0, p - q)); p where p == q leaves nothing
    (rejection then had probability 0)."""
    r = (p - q).clamp_min(0.0)
    total = r.sum()
    return torch.where(total > 0, r / total, p)


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
            return drafts[:n] + [sample(residual(p[n], q[n]), gen)]
    return drafts + [sample(p[k], gen)]


def verify_batch(drafts: list[list[int]], logits: torch.Tensor, q: list[torch.Tensor | None],
                 p: list[torch.Tensor | None], gens: list) -> list[list[int] | None]:
    """Every row of a verify batch at once. logits [sum(k_b + 1), V] (rows in order); per row b:
    q[b] [k_b, V] and p[b] [k_b + 1, V] for sampled rows (None for greedy ones), gens[b] its
    generator. Returns each row's emitted tokens, or None where the target's numbers are not finite.
    The only host sync is the final copy."""
    dev = logits.device
    sizes = [len(d) + 1 for d in drafts]
    B = len(drafts)
    row_of = torch.repeat_interleave(torch.arange(B, device=dev), torch.tensor(sizes, device=dev))  # [N]
    bad = torch.zeros(B, device=dev).index_add_(0, row_of, (~torch.isfinite(logits).all(-1)).float())  # [B]
    best = logits.argmax(-1)  # [N] the greedy rows' answer
    sampled = [b for b in range(B) if p[b] is not None]
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)  # [B] accepted drafts (sampled rows)
    last = torch.zeros(B, dtype=torch.long, device=dev)  # [B] the token after them (sampled rows)
    if sampled:
        ks = [sizes[b] - 1 for b in sampled]
        flat = [b for b in sampled for _ in range(sizes[b] - 1)]
        if flat:  # the ratio test for every drafted token of every sampled row: [M] with M = sum(k)
            x = torch.tensor([t for b in sampled for t in drafts[b]], device=dev)
            pq = torch.cat([p[b][:-1] for b in sampled if sizes[b] > 1])  # [M, V]
            qq = torch.cat([q[b].to(dev) for b in sampled if sizes[b] > 1])  # [M, V]
            m = torch.arange(len(flat), device=dev)
            ratio = pq[m, x] / qq[m, x].clamp_min(1e-30)
            u = torch.cat([torch.rand(sizes[b] - 1, generator=gens[b], device=dev) for b in sampled if sizes[b] > 1])
            pos = torch.cat([torch.arange(k, device=dev) for k in ks if k])  # [M] position within its row
            rows = torch.tensor(flat, device=dev)
            # the first rejected position of each row, or k where every draft was accepted
            first = torch.where(u > ratio, pos, torch.tensor(sizes, device=dev)[rows] - 1)
            n_acc.scatter_reduce_(0, rows, first, "amin", include_self=False)
        for b, k in zip(sampled, ks):
            n = n_acc[b]
            pb = p[b]
            ok = torch.isfinite(pb).all()
            bad[b] += (~ok).float()
            dist = pb[n] if k == 0 else torch.where(n < k, residual(pb[n], q[b].to(dev)[n.clamp(max=k - 1)]), pb[n])
            # a NaN row samples from a stand-in (multinomial cannot take it); the row fails below
            dist = torch.where(ok, dist, torch.ones_like(dist))
            last[b] = torch.multinomial(dist, 1, generator=gens[b])[0]
    host = torch.cat([best, bad.long(), n_acc, last]).tolist()  # the one sync
    N = len(row_of)
    host_best, host_bad, host_n, host_last = host[:N], host[N:N + B], host[N + B:N + 2 * B], host[N + 2 * B:]
    out, at = [], 0
    for b in range(B):
        if host_bad[b]:
            out.append(None)
        elif p[b] is None:
            out.append(accept_prefix(drafts[b], host_best[at:at + sizes[b]]))
        else:
            out.append(drafts[b][:host_n[b]] + [host_last[b]])
        at += sizes[b]
    return out
