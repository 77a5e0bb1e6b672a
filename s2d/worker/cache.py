"""A static, rollback-able KV cache: one preallocated slot per sequence, per-slot lengths.

Rollback is a length change: positions past a slot's length are never read (the attention mask
stops at each query's position), so truncating a slot costs nothing."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_slots, max_len, n_kv_heads, head_dim, dtype, layer_devices):
        # One extra position per slot (index max_len) takes the writes of padding tokens.
        shape = (n_slots, n_kv_heads, max_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]

    def write(self, layer: int, tok_slots, write_pos, k, v):
        """k, v: [B, Hkv, T, D] stored at write_pos [B, T] of the slots tok_slots [B, T]."""
        self.k[layer][tok_slots, :, write_pos] = k.transpose(1, 2)
        self.v[layer][tok_slots, :, write_pos] = v.transpose(1, 2)

    def clear(self, slot: int):
        """Zero a slot: masked positions still enter attention (0 * NaN is NaN), so a slot that held
        a failed sequence's non-finite values is cleared before anyone else gets it."""
        for k, v in zip(self.k, self.v):
            k[slot].zero_()
            v[slot].zero_()

    def move(self, src: int, dst: int, n: int):
        """Copy a slot's first n positions into another slot (compaction, see SlotTable.release)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]

    def read(self, layer: int, slots, n_keys: int, contiguous_from: int | None):
        """Keys and values of the first n_keys positions: a view when slots are adjacent."""
        if contiguous_from is not None:
            s = slice(contiguous_from, contiguous_from + slots.shape[0])
            return self.k[layer][s, :, :n_keys], self.v[layer][s, :, :n_keys]
        return self.k[layer][slots, :, :n_keys], self.v[layer][slots, :, :n_keys]


class SlotTable:
    """Maps sequence ids to cache slots and remembers which tokens each slot holds, so a caller
    that sends a sequence's full token list gets its cache reused up to the common prefix (and
    rebuilt by prefill where it was lost)."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.free = list(range(n_slots - 1, -1, -1))  # pop() takes the lowest
        self.slot: dict[str, int] = {}  # insertion order = least recently used first
        self.tokens: dict[str, list[int]] = {}
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
        self.tokens[seq_id] = []
        return self.slot[seq_id]

    def release(self, seq_id: str) -> bool:
        slot = self.slot.pop(seq_id, None)
        self.tokens.pop(seq_id, None)
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

    def common_prefix(self, seq_id: str, tokens: list[int]) -> int:
        """Length of the cached prefix still valid for `tokens`; at least one token stays uncached
        so the next call has an input."""
        cached = self.tokens[seq_id]
        n = min(len(cached), len(tokens) - 1)
        if cached[:n] != tokens[:n]:
            n = next(i for i in range(n) if cached[i] != tokens[i])
        return n

    def __len__(self):
        return len(self.slot)
