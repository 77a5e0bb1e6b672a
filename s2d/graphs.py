"""Forwards at bucketed static shapes: the unit a CUDA graph captures, and torch.compile compiles.

A target's decode or verify of B rows of T tokens whose slots are 0..B-1 (compaction keeps a
target's live slots there) runs as rows padded to a power of two, keys padded to a power of two of
KEY_BUCKET; a draft segment's step runs the same way over any slots (its keys are gathered). The
padding rows write only the cache's scratch position and attend to key 0; their outputs are
dropped. Every input lives in a static buffer per shape, so:
- on CUDA each shape is captured once as a torch.cuda.CUDAGraph and replayed (one launch instead
  of a few hundred kernels);
- on CPU the same function is compiled by torch.compile (inductor, weights frozen as constants),
  with rows, tokens and keys as dynamic dimensions: four graphs per function (one row or several,
  one token or several) cover every bucket, compiled at startup by `warm_up`, as SGLang captures
  its declared batch sizes, and never while serving (`compilations` counts them);
- with `mode="eager"` the same function runs eagerly from the same buffers, so CPU tests exercise
  the path a GPU runs.
The LM head runs inside the step: a target's on every position, a draft segment's (norm, head,
the exit decision's confidence and argmax) on each row's last token."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from s2d.model import KEY_BUCKET, Batch, CausalLM, Group, confidence, pow2_at_least

log = logging.getLogger("s2d.graphs")

MAX_WIDTH = 16  # tokens per row a static forward takes (verify of up to 15 drafts)
compilations = 0  # graphs compiled in this process (tests: none while serving)


def compile_cache_dir() -> Path:
    """Inductor's on-disk cache, kept across restarts (set TORCHINDUCTOR_CACHE_DIR to move it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def autotune() -> bool:
    """Whether compiling picks each GEMM's kernel by timing it (S2D_AUTOTUNE=0: no, a faster start)."""
    return os.environ.get("S2D_AUTOTUNE") != "0"


def _counting_inductor(gm, example_inputs):
    """Inductor, counting each graph it compiles."""
    global compilations
    from torch._inductor.compile_fx import compile_fx

    compilations += 1
    return compile_fx(gm, example_inputs)


def compiled(fn):
    """`fn` compiled once per dynamic shape class; weights frozen (prepacked bf16/fp32 GEMMs)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    if autotune():
        # inductor's C++ GEMM templates where they time faster than oneDNN: on the few-row GEMMs of
        # decode and verify they skip oneDNN's per-call cost (bf16: about 5 us a GEMM against 30;
        # demo-l's step about 2x faster, docs/bench/compiled.md), for about 50 s more compiling a model
        inductor_config.max_autotune = True
        inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
    # every model's and segment's forward is one code object with its own guards: four graphs each
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
    return torch.compile(fn, backend=_counting_inductor, dynamic=False)


def mark_dynamic(t: torch.Tensor, dims: tuple[int, ...]):
    """Rows, tokens and keys may change size without a new graph; a size of 1 keeps its own graph
    (torch specialises it), so one row or token is as fast as it can be."""
    for d in dims:
        if t.shape[d] > 1:
            torch._dynamo.mark_dynamic(t, d)


@dataclass
class Shape:
    """The static buffers (and, on CUDA, the graph) of one (rows, width, keys) bucket."""

    x: torch.Tensor | None  # [R, T] tokens (None: a draft segment past the first reads its hidden states)
    pos: torch.Tensor  # [R, T]
    write_pos: torch.Tensor  # [R, T]
    mask: torch.Tensor  # [R, 1, T, K]
    slots: torch.Tensor  # [R]
    last: torch.Tensor  # [R] each row's last real token (a draft segment's exit head)
    out: object = None  # the step's output (CUDA graphs)
    graph: object = None


class StaticForward:
    """Layers lo..hi of a model and its head at static shapes. A target's (lo=0, hi=all) takes
    tokens, its slots are 0..B-1 (read as a view of the cache), and it returns every position's
    logits. A sorted-draft segment takes any slots; its input and output are the draft's
    per-position hidden states (`hidden`, read and written inside the step; segment 0 takes
    tokens), and it ends in its exit head: each row's logits at its last token and the exit
    decision's confidence and argmax, so a drafted token is one call per segment and one host sync."""

    def __init__(self, lm: CausalLM, mode: str = "on", segment: tuple[int, int] | None = None,
                 hidden: torch.Tensor | None = None):
        self.lm = lm
        self.lo, self.hi = segment or (0, lm.n_layers)
        self.exit_head = segment is not None
        self.from_tokens = self.lo == 0
        self.hidden = hidden  # [n_slots, max_len + 1, d] a draft's hidden states (exit_head only)
        dev = torch.device(lm.first_device)
        self.capture = mode == "on" and dev.type == "cuda"
        self.compiled = mode == "on" and dev.type == "cpu"
        self.fn = compiled(self._step) if self.compiled else self._step
        self.shapes: dict[tuple[int, int, int], Shape] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0  # forwards served by this path (stats, tests)
        self.one_device = lm.first_device == lm.last_device and len(set(lm.layer_devices)) == 1

    def eligible(self, slots: list[int], counts: list[int]) -> bool:
        contiguous = self.exit_head or slots == list(range(len(slots)))
        return self.one_device and contiguous and max(counts) <= MAX_WIDTH

    def _step(self, x, pos, write_pos, mask, slots, last):
        """Pure tensor code over the static buffers (compiled or captured). A target: the logits
        [R, T, V] of every position (a decode or verify row is all real tokens but its padding). A
        draft segment: (logits [R, V], confidence [R], argmax [R]) at each row's
        last token, its hidden states written for the next segment."""
        lm = self.lm
        R, T = pos.shape
        # targets read slots 0..R-1 as a view; a draft segment gathers its rows' slots
        g = Group(0, R, T, slots, mask, mask.shape[-1], None if self.exit_head else 0)
        b = Batch(slots[:, None].expand(R, T), pos, write_pos, [g], [])
        h = lm.model.embed_tokens(x) if self.from_tokens else self.hidden[slots[:, None], write_pos]  # [R, T, d]
        cos, sin = lm.rope(pos)
        for i in range(self.lo, self.hi):
            h = lm.model.layers[i](h, cos, sin, lm.cache, i, b)
        if not self.exit_head:
            return lm.head(h)  # [R, T, V]: a verify needs every real position
        self.hidden[slots[:, None], write_pos] = h  # padding rows write the scratch position
        logits = lm.head(h[torch.arange(R, device=h.device), last])  # [R, V]
        return logits, *confidence(logits)

    def _shape(self, R: int, T: int, n_keys: int) -> Shape:
        key = (R, T, n_keys)
        if key not in self.shapes:
            dev, lm = self.lm.first_device, self.lm
            z = torch.zeros(R, T, dtype=torch.long, device=dev)
            s = Shape(z.clone() if self.from_tokens else None, z.clone(), z.clone(),
                      torch.zeros(R, 1, T, n_keys, dtype=torch.bool, device=dev), torch.arange(R, device=dev),
                      torch.zeros(R, dtype=torch.long, device=dev))
            for t in (s.x, s.pos, s.write_pos):
                if t is not None:
                    mark_dynamic(t, (0, 1))
            mark_dynamic(s.mask, (0, 2, 3))
            mark_dynamic(s.slots, (0,))
            mark_dynamic(s.last, (0,))
            self.shapes[key] = s
        return self.shapes[key]

    def _fill(self, s: Shape, slots: list[int], starts: list[int], counts: list[int], x: torch.Tensor | None):
        """Copy one forward's inputs, positions, cache rows and mask into the shape's buffers."""
        lm = self.lm
        R, T = s.pos.shape
        n_keys = s.mask.shape[-1]
        B = len(counts)
        pos, write_pos = lm.positions(starts + [0] * (R - B), counts + [0] * (R - B), T, "cpu")
        mask = lm.causal_mask(pos, n_keys)
        mask[B:] = torch.arange(n_keys) == 0  # padding rows: one key, so attention stays finite
        s.pos.copy_(pos.clamp(max=lm.max_len - 1), non_blocking=True)
        s.write_pos.copy_(write_pos, non_blocking=True)
        s.mask.copy_(mask[:, None], non_blocking=True)
        if self.exit_head:
            s.slots.copy_(torch.tensor(slots + slots[:1] * (R - B)), non_blocking=True)  # padding: the scratch position
            s.last.copy_(torch.tensor([c - 1 for c in counts] + [0] * (R - B)), non_blocking=True)
        if x is not None:
            s.x[:B].copy_(x, non_blocking=True)

    def run(self, slots: list[int], starts: list[int], counts: list[int], x: torch.Tensor | None):
        """One step over counts[b] new tokens x[b] ([B, T] tokens; None for a draft segment past the
        first) written at starts[b] of slots[b] (a target's slots are 0..B-1): a target's logits
        [B, T, V], or a draft segment's (logits [B, V], confidence [B], argmax [B])."""
        lm = self.lm
        B, T = len(counts), max(counts)
        end = max(st + c for st, c in zip(starts, counts))  # past the cache: positions() raises
        R = min(pow2_at_least(B), lm.n_slots)
        n_keys = min(pow2_at_least(end, KEY_BUCKET), lm.max_len + 1)
        s = self._shape(R, T, n_keys)
        self._fill(s, slots, starts, counts, x)
        self.replays += 1
        t0 = time.perf_counter()
        if not self.capture:
            out = self.fn(s.x, s.pos, s.write_pos, s.mask, s.slots, s.last)
        else:
            if s.graph is None:
                self._capture(s)
            s.graph.replay()
            out = s.out
        lm.forward_s += time.perf_counter() - t0  # layers and head, as run_layers and logits count them
        return tuple(o[:B] for o in out) if self.exit_head else out[:B]

    def _capture(self, s: Shape):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up before capture (allocator, lazy init)
                self._step(s.x, s.pos, s.write_pos, s.mask, s.slots, s.last)
        torch.cuda.current_stream().wait_stream(side)
        s.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(s.graph, pool=self.pool):
            s.out = self._step(s.x, s.pos, s.write_pos, s.mask, s.slots, s.last)

    def warm_up(self):
        """Compile before serving: one forward of each dynamic class (one row or two, one token or
        two) covers every bucket. It writes the first positions of slots 0 and 1, which no live
        sequence holds yet (a sequence writes every position before it reads it)."""
        lm = self.lm
        if not self.compiled:
            return  # CUDA graphs are captured per bucket on first use; eager needs nothing
        for rows in sorted({1, min(2, lm.n_slots)}):
            for w in (1, 2):
                x = torch.zeros(rows, w, dtype=torch.long, device=lm.first_device) if self.from_tokens else None
                self.run(list(range(rows)), [0] * rows, [w] * rows, x)


def warm_up(name: str, forwards: list[StaticForward]):
    """Compile a model's static forwards at startup, with a progress line."""
    todo = [f for f in forwards if f.compiled]
    if not todo:
        return
    t0, before = time.perf_counter(), compilations
    log.warning("s2d: compiling %s's static forwards (%d functions; cached in %s)...", name, len(todo), compile_cache_dir())
    with torch.inference_mode():
        for f in todo:
            f.warm_up()
    log.warning("s2d: compiled %s: %d graphs in %.1f s", name, compilations - before, time.perf_counter() - t0)
