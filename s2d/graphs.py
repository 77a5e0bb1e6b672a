"""Target decode and verify forwards at bucketed static shapes: the unit a CUDA graph captures.

A forward of B rows of T tokens whose slots are 0..B-1 (compaction keeps a target's live slots
there) runs as rows padded to a power of two, keys padded to a power of two of KEY_BUCKET. The
padding rows write only the cache's scratch position and attend to key 0; their outputs are
dropped. Every input lives in a static buffer per shape, so on CUDA each shape is captured once
as a torch.cuda.CUDAGraph and replayed (one launch instead of a few hundred kernels); on CPU, and
wherever capture is off, the same function runs eagerly from the same buffers, so the CPU tests
exercise this path. The layers run in the graph; the LM head runs eagerly on the rows needed."""
from __future__ import annotations

from dataclasses import dataclass

import time

import torch

from s2d.model import KEY_BUCKET, Batch, CausalLM, Group, pad_tokens, pow2_at_least

MAX_WIDTH = 16  # tokens per row a static forward takes (verify of up to 15 drafts)


@dataclass
class Shape:
    """The static buffers (and, on CUDA, the graph) of one (rows, width, keys) bucket."""

    tokens: torch.Tensor  # [R, T]
    batch: Batch
    out: torch.Tensor | None = None  # [R, T, d] the layers' output
    graph: object = None


class StaticForward:
    def __init__(self, lm: CausalLM, capture: bool | None = None):
        self.lm = lm
        dev = torch.device(lm.first_device)
        self.capture = (dev.type == "cuda") if capture is None else capture
        self.shapes: dict[tuple[int, int, int], Shape] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0  # forwards served by this path (stats, tests)
        self.one_device = lm.first_device == lm.last_device and len(set(lm.layer_devices)) == 1

    def eligible(self, slots: list[int], rows: list[list[int]]) -> bool:
        return self.one_device and slots == list(range(len(slots))) and max(map(len, rows)) <= MAX_WIDTH

    def _shape(self, R: int, T: int, n_keys: int) -> Shape:
        key = (R, T, n_keys)
        if key not in self.shapes:
            dev = self.lm.first_device
            z = torch.zeros(R, T, dtype=torch.long, device=dev)
            group = Group(0, R, T, torch.arange(R, device=dev), torch.zeros(R, 1, T, n_keys, dtype=torch.bool, device=dev),
                          n_keys, 0)
            tok_slots = torch.arange(R, device=dev)[:, None].expand(R, T).contiguous()  # row r is slot r
            self.shapes[key] = Shape(z.clone(), Batch(tok_slots, z.clone(), z.clone(), [group], [T] * R))
        return self.shapes[key]

    def _fill(self, s: Shape, starts: list[int], rows: list[list[int]]):
        """Copy one forward's tokens, positions, cache rows and mask into the shape's buffers."""
        lm = self.lm
        R, T = s.tokens.shape
        n_keys = s.batch.groups[0].n_keys
        B = len(rows)
        pos, write_pos = lm.positions(starts + [0] * (R - B), [len(r) for r in rows] + [0] * (R - B), T, "cpu")
        mask = lm.causal_mask(pos, n_keys)
        mask[B:] = torch.arange(n_keys) == 0  # padding rows: one key, so attention stays finite
        s.tokens.copy_(pad_tokens(rows + [[0]] * (R - B), "cpu"), non_blocking=True)
        s.batch.pos.copy_(pos.clamp(max=lm.max_len - 1), non_blocking=True)
        s.batch.write_pos.copy_(write_pos, non_blocking=True)
        s.batch.groups[0].mask.copy_(mask[:, None], non_blocking=True)

    def _layers(self, s: Shape) -> torch.Tensor:
        return self.lm.run_layers(self.lm.embed(s.tokens), s.batch)

    def run(self, starts: list[int], rows: list[list[int]]) -> torch.Tensor:
        """The layers' output [B, T, d] for rows[b] written at starts[b] of slot b."""
        lm = self.lm
        B, T = len(rows), max(map(len, rows))
        end = max(st + len(r) for st, r in zip(starts, rows))  # past the cache: positions() raises
        R = min(pow2_at_least(B), lm.n_slots)
        n_keys = min(pow2_at_least(end, KEY_BUCKET), lm.max_len + 1)
        s = self._shape(R, T, n_keys)
        self._fill(s, starts, rows)
        self.replays += 1
        if not self.capture:
            return self._layers(s)[:B]
        if s.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up before capture (allocator, lazy init)
                    self._layers(s)
            torch.cuda.current_stream().wait_stream(side)
            s.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(s.graph, pool=self.pool):
                s.out = self._layers(s)
        t0 = time.perf_counter()
        s.graph.replay()
        lm.forward_s += time.perf_counter() - t0  # the layers, as run_layers counts them when eager
        return s.out[:B]
