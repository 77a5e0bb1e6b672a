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

from s2d.worker.sampling import draw, exponentials, sample


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
    parts = [logits.argmax(-1), torch.isfinite(logits).all(-1).long()]  # [N] each: greedy answers, finite rows
    sampled = [b for b in range(len(drafts)) if p[b] is not None]
    if sampled:
        parts += _sample_rows([drafts[b] for b in sampled], [q[b] for b in sampled], [p[b] for b in sampled],
                              [gens[b] for b in sampled], dev)
    host = torch.cat(parts).tolist()  # the one sync
    N, S = len(logits), len(sampled)
    best, finite = host[:N], host[N:2 * N]
    n_acc, last, ok = host[2 * N:2 * N + S], host[2 * N + S:2 * N + 2 * S], host[2 * N + 2 * S:]
    where = {b: j for j, b in enumerate(sampled)}
    out, at = [], 0
    for b, size in enumerate(sizes):
        j = where.get(b)
        if not all(finite[at:at + size]) or (j is not None and not ok[j]):
            out.append(None)
        elif j is None:
            out.append(accept_prefix(drafts[b], best[at:at + size]))
        else:
            out.append(drafts[b][:n_acc[j]] + [last[j]])
        at += size
    return out


def _sample_rows(drafts, q, p, gens, dev) -> list[torch.Tensor]:
    """The sampled rows, all on the device: [accepted drafts] [S], [the token after them] [S],
    [finite] [S]. The ratio test runs over every drafted token of every row at once; each row
    then draws its last token (residual or bonus) with its own generator."""
    S = len(drafts)
    ks = [len(d) for d in drafts]
    n_acc = torch.zeros(S, dtype=torch.long, device=dev)
    drafted = [j for j in range(S) if ks[j]]
    if drafted:  # [M] with M = sum(k): one entry per drafted token
        rows = torch.tensor([j for j in drafted for _ in range(ks[j])], device=dev)
        x = torch.tensor([t for j in drafted for t in drafts[j]], device=dev)
        pq = torch.cat([p[j][:-1] for j in drafted])  # [M, V]
        qq = torch.cat([q[j].to(dev) for j in drafted])  # [M, V]
        m = torch.arange(len(x), device=dev)
        ratio = pq[m, x] / qq[m, x].clamp_min(1e-30)
        u = torch.cat([torch.rand(ks[j], generator=gens[j], device=dev) for j in drafted])
        pos = torch.cat([torch.arange(ks[j], device=dev) for j in drafted])  # position within its row
        k_of = torch.tensor(ks, device=dev)[rows]
        # the first rejected position of each row, or k where every draft was accepted
        n_acc.scatter_reduce_(0, rows, torch.where(u > ratio, pos, k_of), "amin", include_self=False)
    dists, ok = [], []
    for j in range(S):
        n, k, pj = n_acc[j].view(1), ks[j], p[j]  # index_select with a device index: no host sync
        good = torch.isfinite(pj).all()
        at_n = pj.index_select(0, n)[0]
        dist = at_n if k == 0 else torch.where(
            n[0] < k, residual(at_n, q[j].to(dev).index_select(0, n.clamp(max=k - 1))[0]), at_n)
        dists.append(torch.where(good, dist, torch.ones_like(dist)))  # a NaN row draws from a stand-in; it fails
        ok.append(good.long()[None])
    noise = torch.stack([exponentials(p[0].shape[-1], g, dev) for g in gens])  # each row's own generator
    return [n_acc, draw(torch.stack(dists), noise), torch.cat(ok)]
