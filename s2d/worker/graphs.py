"""Forwards at bucketed static shapes: the unit a CUDA graph captures, and AOTInductor compiles.

A target's decode or verify of B rows of T tokens whose slots are 0..B-1 (compaction keeps a
target's live slots there) runs as rows padded to a power of two, keys padded to a power of two of
KEY_BUCKET; a draft segment's step runs the same way over any slots (its keys are gathered). The
padding rows write only the cache's scratch position; their outputs are dropped. Every input lives
in a static buffer per shape (the tokens and a small table of each row's start, count and slot:
positions and the mask are computed inside the step), so:
- on CUDA each shape is captured once as a torch.cuda.CUDAGraph and replayed (one launch instead
  of a few hundred kernels);
- on CPU the same function is exported and compiled ahead of time into a package (s2d/worker/aot.py:
  AOTInductor, weights frozen as constants), with rows, tokens and keys as dynamic dimensions: one
  package per function covers every bucket. `warm_up` builds it at startup, or loads it from the
  disk cache, as SGLang captures its declared batch sizes; nothing compiles while serving
  (`compilations` counts them);
- with `mode="eager"` the same function runs eagerly from the same buffers, so CPU tests exercise
  the path a GPU runs.
The LM head runs inside the step: a target's on every position, a draft segment's (norm, head,
the exit decision's confidence and argmax) on each row's last token. A target's fill step takes
rows in any slots, up to FILL_WIDTH tokens a row, writes the cache and returns the hidden states
without the head: prompt chunks, and decode rows outside slots 0..B-1 (the verifier applies the
head to the positions it verifies)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from s2d.worker import aot
from s2d.worker.model import KEY_BUCKET, Batch, CausalLM, Group, confidence, pow2_at_least

log = logging.getLogger("s2d.worker.graphs")

MAX_WIDTH = 16  # tokens per row a target's decode or verify step takes (verify of up to 15 drafts)
FILL_WIDTH = 256  # tokens per row a fill step (prompt chunks) and a draft segment's step take on CPU
compilations = 0  # steps compiled in this process (tests: none while serving)
loaded = 0  # steps loaded compiled from the disk cache


@dataclass
class Shape:
    """The static buffers (and, on CUDA, the graph) of one (rows, width, keys) bucket. The host
    copies only the tokens and one small table per step; positions and the mask are built inside."""

    x: torch.Tensor | None  # [R, T] tokens (None: a draft segment past the first reads its hidden states)
    rows: torch.Tensor  # [3, R] each row's start position, new-token count and slot (padding rows: count 0)
    cols: torch.Tensor  # [T] 0..T-1 (constant: carries the width)
    keys: torch.Tensor  # [K] 0..K-1 (constant: carries the key count)
    out: object = None  # the step's output (CUDA graphs)
    graph: object = None

    def args(self) -> tuple:
        return self.x, self.rows, self.cols, self.keys


class StaticForward:
    """Layers lo..hi of a model and its head at static shapes. A target's (lo=0, hi=all) takes
    tokens, its slots are 0..B-1 (read as a view of the cache), and it returns every position's
    logits. A sorted-draft segment takes any slots; its input and output are the draft's
    per-position hidden states (`hidden`, read and written inside the step; segment 0 takes
    tokens), and it ends in its exit head: each row's logits at its last token and the exit
    decision's confidence and argmax, so a drafted token is one call per segment and one host sync."""

    def __init__(self, lm: CausalLM, mode: str = "on", segment: tuple[int, int] | None = None,
                 hidden: torch.Tensor | None = None, fill: bool = False):
        self.lm = lm
        self.lo, self.hi = segment or (0, lm.n_layers)
        self.exit_head = segment is not None
        self.fill = fill  # a target's prompt chunks: any slots, the cache written, no head
        self.gather = self.exit_head or fill  # rows in any slots (their keys gathered), not 0..R-1
        self.from_tokens = self.lo == 0
        self.hidden = hidden  # [n_slots, max_len + 1, d] a draft's hidden states (exit_head only)
        dev = torch.device(lm.device)
        self.capture = mode == "on" and dev.type == "cuda"
        self.compiled = mode == "on" and dev.type == "cpu"
        # chunks of any length through one package on CPU; a CUDA graph is captured per shape, so
        # there prompt chunks stay within the decode and verify widths (a bounded set of graphs)
        self.max_width = FILL_WIDTH if self.gather and not self.capture else MAX_WIDTH
        self.run_compiled = None  # the package's runner (s2d/worker/aot.py), set by compile()
        self.shapes: dict[tuple[int, int, int], Shape] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0  # forwards served by this path (stats, tests)

    def eligible(self, slots: list[int], counts: list[int]) -> bool:
        contiguous = self.gather or slots == list(range(len(slots)))
        return contiguous and max(counts) <= self.max_width

    def _step(self, x, rows, cols, keys):
        """Pure tensor code over the static buffers (compiled or captured). A target: the logits
        [R, T, V] of every position (a decode or verify row is all real tokens but its padding). A
        draft segment: (logits [R, V], confidence [R], argmax [R]) at each row's last token, its
        hidden states written for the next segment. A fill: the cache written, and the hidden
        states [R, T, d] returned."""
        lm = self.lm
        starts, counts, slots = rows  # [R] each
        R, T = rows.shape[1], cols.shape[0]
        pos, write_pos = lm.row_positions(starts, counts, cols)  # [R, T]; padding writes the scratch position
        # a padding row (count 0, start 0) sees keys 0..t of a slot whose numbers are finite, so its
        # dropped output stays finite
        mask = lm.causal_mask(pos, keys)[:, None]  # [R, 1, T, K]
        pos = pos.clamp(max=lm.max_len - 1)
        # decode and verify read slots 0..R-1 as a view; a draft segment and a fill gather their rows' slots
        g = Group(0, R, T, slots, mask, keys.shape[0], None if self.gather else 0)
        b = Batch(slots[:, None].expand(R, T), pos, write_pos, [g], [])
        h = lm.model.embed_tokens(x) if self.from_tokens else self.hidden[slots[:, None], write_pos]  # [R, T, d]
        cos, sin = lm.rope(pos)
        for i in range(self.lo, self.hi):
            h = lm.model.layers[i](h, cos, sin, lm.cache, i, b)
        if self.fill:
            return h  # [R, T, d]: a prompt chunk's are dropped; a decode row's take the head outside
        if not self.exit_head:
            return lm.head(h)  # [R, T, V]: a verify needs every real position
        self.hidden[slots[:, None], write_pos] = h  # padding rows write the scratch position
        last = (counts - 1).clamp(min=0)  # [R] each row's last real token
        logits = lm.head(h[torch.arange(R, device=h.device), last])  # [R, V]
        return logits, *confidence(logits)

    def _shape(self, R: int, T: int, n_keys: int) -> Shape:
        key = (R, T, n_keys)
        if key not in self.shapes:
            dev = self.lm.device
            s = Shape(torch.zeros(R, T, dtype=torch.long, device=dev) if self.from_tokens else None,
                      torch.zeros(3, R, dtype=torch.long, device=dev), torch.arange(T, device=dev),
                      torch.arange(n_keys, device=dev))
            self.shapes[key] = s
        return self.shapes[key]

    def _fill(self, s: Shape, slots: list[int], starts: list[int], counts: list[int], x: torch.Tensor | None):
        """Copy one forward's tokens and rows (start, count, slot) into the shape's buffers."""
        pad = s.rows.shape[1] - len(counts)
        # padding rows: no tokens; in slots B..R-1 of a view, else in the first row's slot
        pad_slots = slots[:1] * pad if self.gather else list(range(len(counts), len(counts) + pad))
        s.rows.copy_(torch.tensor([starts + [0] * pad, counts + [0] * pad, slots + pad_slots]), non_blocking=True)
        if x is not None:
            s.x[:len(counts)].copy_(x, non_blocking=True)

    def run(self, slots: list[int], starts: list[int], counts: list[int], x: torch.Tensor | None):
        """One step over counts[b] new tokens x[b] ([B, T] tokens; None for a draft segment past the
        first) written at starts[b] of slots[b] (a target's slots are 0..B-1): a target's logits
        [B, T, V], or a draft segment's (logits [B, V], confidence [B], argmax [B])."""
        lm = self.lm
        B, T = len(counts), max(counts)
        end = max(st + c for st, c in zip(starts, counts))
        lm.check_fits(end)
        R = min(pow2_at_least(B), lm.n_slots)
        n_keys = min(pow2_at_least(end, KEY_BUCKET), lm.max_len)
        s = self._shape(R, T, n_keys)
        self._fill(s, slots, starts, counts, x)
        self.replays += 1
        t0 = time.perf_counter()
        if self.compiled:
            out = self._run_compiled(s)
        elif not self.capture:
            out = self._step(*s.args())
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
                self._step(*s.args())
        torch.cuda.current_stream().wait_stream(side)
        s.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(s.graph, pool=self.pool):
            s.out = self._step(*s.args())

    def compile(self):
        """Build or load this step's package (s2d/worker/aot.py), before serving."""
        global compilations, loaded
        if not self.compiled or self.run_compiled is not None:
            return
        dev = self.lm.device
        # an example of the sizes served (autotuning times the GEMMs at them): two rows of two
        # tokens, or of a chunk's 64 for a fill
        R, T = min(2, self.lm.n_slots), 64 if self.fill else 2
        example = self._shape(R, T, min(pow2_at_least(T + 1, 2 * KEY_BUCKET), self.lm.max_len))
        example.rows[1:] = torch.tensor([[T] * R, list(range(R))], device=dev)  # slots 0..R-1
        self.run_compiled, built = aot.load_or_build(self, example.args())
        compilations += built
        loaded += not built

    def _run_compiled(self, s: Shape):
        if self.run_compiled is None:
            raise RuntimeError("a compiled static forward ran before compile(): call warm_up at startup")
        out = self.run_compiled(aot.flat_inputs(self, s.args()))
        return out if self.exit_head else out[0]


def attach(lm: CausalLM) -> CausalLM:
    """Give a target its static steps, where its static_forward asks for them: decode and verify,
    and prompt chunks."""
    if lm.static_mode:
        lm.static, lm.static_fill = StaticForward(lm, lm.static_mode), StaticForward(lm, lm.static_mode, fill=True)
    return lm


def warm_up(name: str, forwards: list[StaticForward]):
    """Build (or load from the disk cache) a model's compiled steps at startup, with a progress line."""
    todo = [f for f in forwards if f.compiled]
    if not todo:
        return
    t0, before = time.perf_counter(), compilations
    log.warning("s2d: compiling %s's static forwards (%d functions, or loading them from %s)...", name, len(todo),
                aot.cache_dir())
    with torch.inference_mode():
        for f in todo:
            f.compile()
    log.warning("s2d: %s ready: %d compiled, %d loaded, in %.1f s", name, compilations - before,
                len(todo) - (compilations - before), time.perf_counter() - t0)
