"""The two halves of a speculative step as stateful workers over a model's KV cache: the proposer
(shared sorted draft, adaptive exits) and the verifier (one target, rejection sampling).

Each item carries a sequence's full token list; a worker reuses its cache up to the common prefix
and prefills the rest. So the caller's token state is the only truth, rollback is implicit, and a
worker that lost a sequence's cache rebuilds it. s2d/core/executor.py drives both in ticks, over the
wire or in process."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from s2d.core.config import SamplingParams
from s2d.worker.draft import SortedDraft
from s2d.worker.model import KEY_BUCKET, CausalLM, pack_tokens, pad_tokens
from s2d.worker.parallel import TensorParallel
from s2d.worker.rejection import verify_batch
from s2d.worker.sampling import draw, exponentials, generator, probs_from_logits
from s2d.worker.slots import SlotTable

SPLIT_KEYS = 4  # decode rows attend in two groups past this ratio of context lengths (split_by_keys)
INLINE_TOKENS = 8  # unseen draft tokens (before the last) up to this many ride in its first step; more: a prefill


@dataclass
class Forward:
    """One forward a worker ran: what (draft:S for a draft segment, verify, prefill, or
    verify+prefill), how many rows and tokens, and its wall seconds (batch building included)."""

    what: str
    rows: int
    tokens: int
    seconds: float


@dataclass
class PrefillItem:
    seq_id: str
    tokens: list[int]  # the whole known list; the uncached part is filled, no logits


@dataclass
class ProposeItem:
    seq_id: str
    tokens: list[int]
    k: int  # most tokens to draft
    thresholds: list[float]  # one per exit; the last exit always emits
    stop_threshold: float
    params: SamplingParams
    seed: int


@dataclass
class Proposal:
    drafts: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)  # exit depth (layers) of each drafted token
    q: torch.Tensor | None = None  # [k, V] the probabilities each draft was sampled from (sampling only)
    error: str | None = None  # drafting failed for this sequence alone
    # per draft: (confidence, argmax) at each exit passed
    trace: list[list[tuple[float, int]]] = field(default_factory=list)


@dataclass
class VerifyItem:
    seq_id: str
    tokens: list[int]
    drafts: list[int]
    q: torch.Tensor | None
    params: SamplingParams
    seed: int


@dataclass
class Verdict:
    tokens: list[int]  # accepted drafts, then one token of the target's
    accepted: int
    error: str | None = None  # verification failed for this sequence alone


class Worker:
    def __init__(self, n_slots: int):
        self.table = SlotTable(n_slots)
        self.known: dict[str, list[int]] = {}  # each live sequence's tokens: as sent, then what this worker added
        self.batch_sizes: list[int] = []  # sizes of the batches served (for stats)
        self.prefill_forwards = 0  # forwards that only filled the cache (prompt chunks, long resent parts)
        self.failed: set[str] = set()  # sequences whose numbers went bad here: their slots are cleared on release
        self.forwards: list[Forward] = []  # since the executor last took them (the cost model's input)

    def sync(self, seq_id: str, start: int, new: list[int]) -> list[int] | None:
        """A sequence's token buffer after the scheduler's update (tokens[start:] are `new`), kept
        in place: a tick costs what it sends, not the context. None where this worker lacks
        tokens[:start] (restarted, or evicted): the scheduler then sends them all."""
        buf = self.known.setdefault(seq_id, [])
        if len(buf) < start:
            return None
        del buf[start:]
        buf.extend(new)
        self.table.clamp(seq_id, start)
        return buf

    def _own(self, item):
        """Make the item's tokens this worker's buffer. Through the executor they are already
        (Worker.sync); a caller that bypassed it (tests, tools) has its list copied, and the cache
        is kept as far as the old buffer agrees with it."""
        buf = self.known.get(item.seq_id)
        if buf is item.tokens:
            return
        old, new = buf or [], item.tokens
        n = min(len(old), len(new))
        self.table.clamp(item.seq_id, next((i for i in range(n) if old[i] != new[i]), n))
        self.known[item.seq_id] = item.tokens = list(new)

    def _observe(self, what: str, rows: int, tokens: int, seconds: float):
        self.forwards.append(Forward(what, rows, tokens, seconds))

    def _timed(self, what: str, rows: int, tokens: int, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self._observe(what, rows, tokens, time.perf_counter() - t0)
        return out

    def take_forwards(self) -> tuple[list[Forward], float]:
        """The forwards since the last call, and the seconds the model spent in its layers and head."""
        out, self.forwards = self.forwards, []
        lm = self.model
        spent, lm.forward_s = lm.forward_s, 0.0
        return out, spent

    def release(self, seq_id: str) -> bool:
        slot = self.table.slot.get(seq_id)
        self._evicted(seq_id, slot)
        if not self.table.release(seq_id):
            return False
        moved = self.table.compact(slot)
        if moved:
            seq, src, dst = moved
            self.move_slot(seq, src, dst)
            if seq in self.failed:  # its bad numbers must not stay behind in a free slot
                self.clear_slot(src)
        return True

    def _evicted(self, seq_id: str, slot: int | None):
        """Forget a sequence whose slot is freed; a failed one's slot is cleared of its numbers."""
        self.known.pop(seq_id, None)
        if seq_id in self.failed and slot is not None:
            self.failed.discard(seq_id)
            self.clear_slot(slot)

    def clear_slot(self, slot: int):
        raise NotImplementedError

    def move_slot(self, seq_id: str, src: int, dst: int):
        """Compaction moved `seq_id` from slot src to dst: move its caches."""
        raise NotImplementedError

    def stats(self) -> dict:
        sizes = self.batch_sizes
        return {"held": self.held, "batches": len(sizes), "max_batch": max(sizes, default=0),
                "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0, "evicted": self.table.evicted,
                "prefill_forwards": self.prefill_forwards, "static_steps": sum(f.replays for f in self.static_steps())}

    def static_steps(self) -> list:
        """The model's static-shape steps (s2d/worker/graphs.py)."""
        raise NotImplementedError

    def _sync(self, items, truncate) -> tuple[list[int], list[int]]:
        """Slot and reusable cached length of each item."""
        slots, common = [], []
        pinned = {it.seq_id for it in items}
        for it in items:
            slots.append(self.table.acquire(it.seq_id, pinned, self._evicted))
            self._own(it)
            common.append(self.table.reusable(it.seq_id, len(it.tokens)))
            truncate(slots[-1], common[-1])
        return slots, common

    @property
    def held(self) -> int:
        return len(self.table)


def long_uncached(items, cached: list[int]) -> list[int]:
    """Indices of the items with more than INLINE_TOKENS unseen tokens before their last one."""
    return [i for i, (it, c) in enumerate(zip(items, cached)) if len(it.tokens) - 1 - c > INLINE_TOKENS]


class Proposer(Worker):
    def __init__(self, draft: SortedDraft):
        super().__init__(draft.lm.n_slots)
        self.draft, self.model = draft, draft.lm
        self.exits = draft.exits

    def static_steps(self) -> list:
        return self.draft.static

    def clear_slot(self, slot: int):
        self.draft.lm.cache.clear(slot)
        self.draft.hidden[slot].zero_()

    def move_slot(self, seq_id: str, src: int, dst: int):
        d = self.draft
        n = max(d.fill[src])
        d.lm.cache.move(src, dst, n)
        d.hidden[dst, :n] = d.hidden[src, :n]
        d.fill[dst], d.fill[src] = d.fill[src], [0] * len(d.exits)

    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]):
        """Prompt chunks through every segment of the draft, in a forward of their own."""
        slots, _ = self._sync(items, self.draft.truncate)
        self.prefill_forwards += 1
        self._timed("prefill", len(items), sum(len(it.tokens) for it in items), self.draft.prefill,
                    slots, [it.tokens for it in items], [len(it.tokens) for it in items])
        for it in items:
            self.table.cached[it.seq_id] = len(it.tokens)

    @torch.inference_mode()
    def propose(self, items: list[ProposeItem]) -> list[Proposal]:
        """Draft for every item at once, token by token. Per drafted token, each segment's exit
        decision is one host sync for the whole batch; sampled rows add one more for their draws."""
        slots, _ = self._sync(items, self.draft.truncate)
        long = long_uncached(items, [self.draft.fill[sl][0] for sl in slots])
        if long:  # a long unseen part (a resent sequence) is prefilled apart, not padded into the decodes
            self.prefill_forwards += 1
            self._timed("prefill", len(long), sum(len(items[i].tokens) for i in long), self.draft.prefill,
                        [slots[i] for i in long], [items[i].tokens for i in long],
                        [len(items[i].tokens) - 1 for i in long])
        work = [it.tokens for it in items]  # the buffers (Worker.sync): the drafts go on them
        out = [Proposal() for _ in items]
        qs: list[list[torch.Tensor]] = [[] for _ in items]
        gens = [None if it.params.greedy else generator(it.seed, self.draft.lm.device) for it in items]
        # slot order: adjacent slots read the cache as a view
        active = sorted((i for i, it in enumerate(items) if it.k > 0), key=lambda i: slots[i])
        self.batch_sizes.append(len(active))
        while active:
            t_step = time.perf_counter()
            rows = len(active)
            emitted = self._to_exits(active, items, slots, work, out)
            drawn = self._draw(emitted, items, gens, qs, out)
            for i in active:
                if out[i].error:
                    continue
                tok = drawn.get(i, emitted[i][2])
                work[i].append(tok)
                out[i].drafts.append(tok)
                out[i].exits.append(self.exits[emitted[i][0]])
            active = [i for i in active if not out[i].error and len(out[i].drafts) < items[i].k
                      and emitted[i][1] >= items[i].stop_threshold]
            self._observe("draft_step", rows, rows, time.perf_counter() - t_step)  # one token for every active row
        for i, it in enumerate(items):
            self.table.cached[it.seq_id] = self.draft.fill[slots[i]][0]
            if qs[i]:
                out[i].q = torch.stack(qs[i])
        return out

    def _to_exits(self, active, items, slots, work, out) -> dict[int, tuple]:
        """Run the active rows' next token through the segments until each is confident enough at an
        exit (the last always emits): {row: (segment, confidence, argmax, logits)}."""
        pending, emitted, last = active, {}, len(self.exits) - 1
        traces = {i: [] for i in active}
        for s in range(len(self.exits)):
            logits, conf, top = self._timed(f"draft:{s}", len(pending), len(pending), self.draft.run_segment, s,
                                            [slots[i] for i in pending], [work[i] for i in pending],
                                            [len(work[i]) for i in pending])  # [P, V], [P], [P]
            conf_h, top_h = torch.stack((conf, top.to(conf.dtype))).tolist()  # the exit decision's one sync
            for j, i in enumerate(pending):
                traces[i].append((conf_h[j], int(top_h[j])))
                if s == last or conf_h[j] >= items[i].thresholds[s] or conf_h[j] != conf_h[j]:  # NaN: stop, fail below
                    emitted[i] = (s, conf_h[j], int(top_h[j]), logits[j])
            pending = [i for i in pending if i not in emitted]
            if not pending:
                break
        for i in active:
            out[i].trace.append(traces[i])
        return emitted

    def _draw(self, emitted, items, gens, qs, out) -> dict[int, int]:
        """The sampled rows' drafts, drawn from each row's distribution at its exit (one host copy
        for all); greedy rows take the argmax already on the host. Rows whose numbers went bad fail."""
        draws = {}
        for i, (_s, conf, _, logits) in emitted.items():
            if conf != conf:
                self._fail_draft(items[i], out[i], "the draft's logits are not finite")
            elif gens[i] is not None:
                try:
                    q = probs_from_logits(logits, items[i].params)  # [V]
                except Exception as e:  # noqa: BLE001 - this sequence alone fails
                    self._fail_draft(items[i], out[i], f"{type(e).__name__}: {e}")
                    continue
                ok = torch.isfinite(q).all()
                draws[i] = (torch.where(ok, q, torch.ones_like(q)), ok, exponentials(q.shape[-1], gens[i], q.device))
                qs[i].append(q)
        if not draws:
            return {}
        dist, ok, noise = (torch.stack([d[j] for d in draws.values()]) for j in range(3))  # [S, V], [S], [S, V]
        host = torch.stack((draw(dist, noise), ok.long()), 1).tolist()  # one copy for every sampled row
        drawn = {}
        for i, (tok, ok) in zip(draws, host):
            if ok:
                drawn[i] = tok
            else:
                self._fail_draft(items[i], out[i], "the draft's probabilities are not finite")
        return drawn

    def _fail_draft(self, item, proposal, why: str):
        proposal.error = f"drafting failed: {why}"
        self.failed.add(item.seq_id)


def padded(rows: list[list[int]]) -> int:
    """Tokens a forward computes for rows padded to the longest."""
    return len(rows) * max(map(len, rows), default=0)


def split_by_keys(rows: list[int], ends: list[int]) -> list[list[int]]:
    """The decode rows in one group, or two when the longest context is more than SPLIT_KEYS times
    the shortest: short contexts then do not attend over the long one's keys. Below that, one group
    is cheaper: its slots are often adjacent, read as a view of the cache, where each of two
    groups would gather (copy) its keys and values."""
    order = sorted(rows, key=lambda i: ends[i])
    if len(order) < 2 or ends[order[-1]] <= SPLIT_KEYS * max(ends[order[0]], KEY_BUCKET):
        return [order]
    cut = max(range(1, len(order)), key=lambda j: ends[order[j]] / max(ends[order[j - 1]], 1))
    return [order[:cut], order[cut:]]


class Verifier(Worker):
    def __init__(self, lm: CausalLM):
        super().__init__(lm.n_slots)
        self.lm = self.model = lm

    def static_steps(self) -> list:
        return [f for f in (self.lm.static, self.lm.static_fill) if f]

    def clear_slot(self, slot: int):
        self.lm.cache.clear(slot)

    def move_slot(self, seq_id: str, src: int, dst: int):
        self.lm.cache.move(src, dst, self.table.cached[seq_id])

    @torch.inference_mode()
    def verify(self, items: list[VerifyItem], chunks: list[PrefillItem] = ()) -> list[Verdict]:
        """One forward for the tick: prompt chunks (and long unseen parts) fill the cache in a group
        of their own, the decode rows (k+1 wide) are verified in one or two more."""
        lm = self.lm
        slots, common = self._sync([*chunks, *items], lambda slot, n: None)
        n = len(chunks)
        fill = [(slots[i], common[i], it.tokens[common[i]:]) for i, it in enumerate(chunks)]
        starts, rows = common[n:], []  # per item: where its decode row starts, and the row
        for i, it in enumerate(items):
            if len(it.tokens) - 1 - starts[i] > 1:  # its unseen part is filled beside, not padded in
                fill.append((slots[n + i], starts[i], it.tokens[starts[i]:-1]))
                starts[i] = len(it.tokens) - 1
            rows.append(it.tokens[starts[i]:] + it.drafts)
        t0 = time.perf_counter()
        filled = bool(fill)
        self.prefill_forwards += filled
        n_tokens = padded([f[2] for f in fill])  # and the decode groups' below: what the forwards compute
        if fill and lm.static_fill:  # prompt chunks through the fill step, ahead of the decode rows
            sl, st, toks = (list(col) for col in zip(*fill))
            if lm.static_fill.eligible(sl, lens := [len(t) for t in toks]):
                lm.static_fill.run(sl, st, lens, pad_tokens(toks, lm.device))
                fill = []
        dec = split_by_keys(list(range(len(items))), [st + len(r) for st, r in zip(starts, rows)]) if items else []
        # slot order: adjacent slots read the cache as a view
        dec = [sorted(g, key=lambda i: slots[n + i]) for g in dec]
        groups = ([[list(col) for col in zip(*fill)]] if fill else []) + \
            [[[slots[n + i] for i in g], [starts[i] for i in g], [rows[i] for i in g]] for g in dec]
        if items:
            self.batch_sizes.append(len(items))
        n_tokens += sum(padded(rs) for _, _, rs in groups[len(groups) - len(dec):])
        judge = lm.tp.rank == 0  # rank 0 of a tensor-parallel group alone samples: only it needs logits
        verified: dict[int, torch.Tensor] = {}  # item -> the logits [k+1, V] of its row's last k+1 positions
        dec_groups = groups[len(groups) - len(dec):]
        if lm.static and not fill and all(lm.static.eligible(sl, c := [len(r) for r in rs]) or
                                          lm.static_fill.eligible(sl, c) for sl, _, rs in dec_groups):
            # each decode group through a compiled step (on CPU; CUDA graphs on GPU): rows in slots
            # 0..B-1 through the target's (the cache read as a view, the head inside), others
            # through the fill step (their keys gathered), whose hidden states take the head here
            for g, (sl, st, rs) in zip(dec, dec_groups):
                counts = [len(r) for r in rs]
                view = lm.static.eligible(sl, counts)
                out = (lm.static if view else lm.static_fill).run(sl, st, counts, pad_tokens(rs, lm.device))
                if judge:  # out: [B, T, V] logits, or [B, T, d] hidden states
                    at = [(r, p) for r, i in enumerate(g) for p in range(counts[r] - len(items[i].drafts) - 1,
                                                                         counts[r])]
                    picked = out[tuple(torch.tensor(at, device=out.device).T)]  # [sum(k+1), V or d]
                    self._split(verified, g, items, picked if view else lm.logits(picked))
        elif groups:
            batch = lm.packed([(sl, st, [len(r) for r in rs]) for sl, st, rs in groups])
            h = lm.run_layers(lm.embed(pack_tokens([rs for _, _, rs in groups], lm.device)), batch)  # [1, N, d]
            if judge:
                at = [p for grp, g in zip(batch.groups[len(groups) - len(dec):], dec) for r, i in enumerate(g)
                      for p in range(grp.start + r * grp.width + len(rows[i]) - len(items[i].drafts) - 1,
                                     grp.start + r * grp.width + len(rows[i]))]
                self._split(verified, [i for g in dec for i in g], items,
                            lm.logits(h[0, torch.tensor(at, device=h.device)]))
        for it in chunks:
            self.table.cached[it.seq_id] = len(it.tokens)
        if not items:
            self._observe("prefill", len(chunks), n_tokens, time.perf_counter() - t0)
            return []
        # rejection sampling runs once, on rank 0 of a tensor-parallel group, which shares the verdicts
        verdicts = self._judge(items, [verified[i] for i in range(len(items))]) if judge else None
        verdicts = share_verdicts(lm.tp, verdicts, len(items))
        # timed to the batch's one sync: on a GPU the forward has run by then, not only launched
        self._observe("verify" if not filled else "verify+prefill", len(items), n_tokens, time.perf_counter() - t0)
        for it, v in zip(items, verdicts):
            self.table.cached[it.seq_id] = len(it.tokens) + v.accepted
            if v.error:
                self.failed.add(it.seq_id)
            else:
                it.tokens.extend(it.drafts[:v.accepted])  # the buffer (Worker.sync) holds what the cache holds
        return verdicts

    @staticmethod
    def _split(verified: dict, order: list[int], items: list[VerifyItem], logits: torch.Tensor):
        """Hand each item of `order` its k+1 rows of `logits` (laid out in that order)."""
        for i, part in zip(order, logits.split([len(items[i].drafts) + 1 for i in order])):
            verified[i] = part

    def _judge(self, items: list[VerifyItem], per_item: list[torch.Tensor]) -> list[Verdict]:
        """Each item's verdict from the target's logits at its last k+1 positions ([k+1, V] each):
        its accepted drafts and the target's token."""
        verdicts: list[Verdict | None] = [None] * len(items)
        batch, ps, gens = [], [], []
        for i, (it, lg) in enumerate(zip(items, per_item)):
            try:
                p = None if it.params.greedy else probs_from_logits(lg, it.params)  # [k+1, V]
            except Exception as e:  # noqa: BLE001 - this sequence alone fails
                verdicts[i] = failed_verdict(f"{type(e).__name__}: {e}")
                continue
            batch.append(i)
            ps.append(p)
            gens.append(None if p is None else generator(it.seed, lg.device))
        if batch:
            emitted = verify_batch([items[i].drafts for i in batch], torch.cat([per_item[i] for i in batch]),
                                   [items[i].q for i in batch], ps, gens)
            for i, toks in zip(batch, emitted):
                # greedy would pick NaN's index silently, sampling would pass it
                verdicts[i] = failed_verdict("the target's numbers are not finite") if toks is None else \
                    Verdict(toks, len(toks) - 1)
        return verdicts


def failed_verdict(why: str) -> Verdict:
    return Verdict([], 0, f"verification failed: {why}")


def share_verdicts(tp: TensorParallel, verdicts: list[Verdict] | None, n: int) -> list[Verdict]:
    """Rank 0's verdicts on every rank of a tensor-parallel group (the others pass None): one small
    all-reduce of the accepted counts (-1: failed), so every rank's cache keeps what rank 0's keeps."""
    if tp.size == 1:
        return verdicts
    counts = [-1 if v.error else v.accepted for v in verdicts] if verdicts else [0] * n
    counts = tp.reduce(torch.tensor(counts, dtype=torch.float32, device=tp.device)).tolist()
    return verdicts or [failed_verdict("on rank 0") if c < 0 else Verdict([], int(c)) for c in counts]
