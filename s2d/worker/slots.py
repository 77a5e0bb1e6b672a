"""Which cache slot each sequence holds, and how far its cache is computed."""
from __future__ import annotations


class SlotTable:
    """Maps sequence ids to cache slots, and counts per sequence the tokens its slot holds (its
    progress, as vLLM's num_computed_tokens): the worker's token buffer up to that count is in the
    cache. A sequence's slot may be lost (evicted, a restarted worker): its owner then resends its
    tokens and the cache is rebuilt by prefill."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.free = list(range(n_slots - 1, -1, -1))  # pop() takes the lowest
        self.slot: dict[str, int] = {}  # insertion order = least recently used first
        self.cached: dict[str, int] = {}  # seq_id -> tokens its slot holds
        self.evicted = 0

    def acquire(self, seq_id: str, pinned: set[str] = frozenset(), on_evict=None) -> int:
        """The sequence's slot. With none free, the least recently used sequence outside `pinned`
        is evicted: always safe, since its owner resends its tokens and it is rebuilt by prefill.
        `on_evict(victim, slot)` runs first (a worker clears a slot that held bad numbers)."""
        if seq_id in self.slot:
            self.slot[seq_id] = self.slot.pop(seq_id)  # mark as recently used
            return self.slot[seq_id]
        if not self.free:
            victim = next((s for s in self.slot if s not in pinned), None)
            if victim is None:
                raise RuntimeError(f"a batch of {len(pinned)} sequences exceeds the {self.n_slots} KV-cache slots")
            if on_evict:
                on_evict(victim, self.slot[victim])
            self.release(victim)
            self.evicted += 1
        self.slot[seq_id] = self.free.pop()
        self.cached[seq_id] = 0
        return self.slot[seq_id]

    def release(self, seq_id: str) -> bool:
        slot = self.slot.pop(seq_id, None)
        self.cached.pop(seq_id, None)
        if slot is None:
            return False
        self.free.append(slot)
        return True

    def compact(self, freed: int) -> tuple[str, int, int] | None:
        """After `freed` was released: move the sequence in the highest live slot above it down into
        it, so live slots stay 0..n-1 and a batch of them reads the cache as a view instead of
        gathering (copying) every layer's keys and values on every forward. Returns (the moved
        sequence, src, dst) for the caller to move the cached data, or None."""
        if not self.slot:
            return None
        seq, src = max(self.slot.items(), key=lambda kv: kv[1])
        if src < freed:
            return None
        self.free.remove(freed)
        self.slot[seq] = freed
        self.free.append(src)
        return seq, src, freed

    def reusable(self, seq_id: str, n_tokens: int) -> int:
        """How much of a sequence's cache a forward over its n_tokens reuses: all it holds, but at
        least one token stays uncached so the forward has an input."""
        return min(self.cached[seq_id], n_tokens - 1)

    def clamp(self, seq_id: str, n: int):
        """The sequence's tokens from n on were rewritten: its cache holds at most n."""
        if seq_id in self.cached:
            self.cached[seq_id] = min(self.cached[seq_id], n)

    def __len__(self):
        return len(self.slot)
