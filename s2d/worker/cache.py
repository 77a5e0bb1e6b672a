"""A static, rollback-able KV cache: one preallocated slot per sequence, per-slot lengths.

Rollback is a length change: positions past a slot's length are never read (the attention mask
stops at each query's position), so truncating a slot costs nothing."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_slots, max_len, n_layers, n_kv_heads, head_dim, dtype, device):
        # One extra position per slot (index max_len) takes the writes of padding tokens.
        shape = (n_slots, n_kv_heads, max_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

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
        """Copy a slot's first n positions into another slot (compaction: s2d/worker/slots.py)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]

    def read(self, layer: int, slots, n_keys: int, contiguous_from: int | None):
        """Keys and values of the first n_keys positions: a view when slots are adjacent."""
        if contiguous_from is not None:
            s = slice(contiguous_from, contiguous_from + slots.shape[0])
            return self.k[layer][s, :, :n_keys], self.v[layer][s, :, :n_keys]
        return self.k[layer][slots, :, :n_keys], self.v[layer][slots, :, :n_keys]
