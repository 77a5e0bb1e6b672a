"""A static step compiled ahead of time on CPU: torch.export, then AOTInductor, into a package on disk.

The package runs the step from C++: no Python guards or wrapper on each call (a drafted token to
exit 1 took 0.56 ms through torch.compile and 0.17 ms as a package, benchmarks/step_costs.py in
docs/bench/compiled.md), and a restart loads it in a second instead of compiling again. One package
per static forward: rows, tokens and keys are dynamic dimensions. Weights are frozen into it as
constants; the KV cache and the draft's hidden states are inputs the step writes in place.

A package is named by what it was built from (the weights, dtype, slots, context, segment, torch,
this code and the GEMM autotuning), so a changed checkpoint or code gets a new one."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn


def autotune() -> bool:
    """Whether compiling picks each GEMM's kernel by timing it (S2D_AUTOTUNE=0: no, a faster start)."""
    return os.environ.get("S2D_AUTOTUNE") != "0"


def cache_dir() -> Path:
    """Where packages live across restarts: inductor's cache (TORCHINDUCTOR_CACHE_DIR moves it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache

    return Path(inductor_cache()) / "s2d-aot"


class _Step(nn.Module):
    """StaticForward._step with the caches (and a draft's hidden states) as explicit inputs, which
    torch.export needs for the writes into them to stay in place."""

    def __init__(self, sf):
        super().__init__()
        self.lm = sf.lm  # its weights become the package's constants
        self.sf = [sf]  # not a submodule

    def forward(self, x, rows, cols, keys, hidden, ks, vs):
        sf = self.sf[0]
        cache = sf.lm.cache
        saved = cache.k, cache.v, sf.hidden
        cache.k, cache.v, sf.hidden = list(ks), list(vs), hidden
        try:
            return sf._step(x, rows, cols, keys)
        finally:
            cache.k, cache.v, sf.hidden = saved


def inputs(sf, x, rows, cols, keys) -> tuple:
    """_Step's inputs: a shape's buffers, then the draft's hidden states and the KV cache."""
    return x, rows, cols, keys, sf.hidden, tuple(sf.lm.cache.k), tuple(sf.lm.cache.v)


def flat_inputs(sf, args: tuple) -> list[torch.Tensor]:
    """The same, as the list a package's runner takes (None left out, as torch.export flattens)."""
    x, rows, cols, keys, hidden, ks, vs = inputs(sf, *args)
    return [t for t in (x, rows, cols, keys, hidden, *ks, *vs) if t is not None]


def _fingerprint(sf) -> str:
    """What the package is built from: which step (segment, fill), shapes, dtype, weights (each
    tensor's sum and first values), torch, this code, the autotuning choice, the tensor-parallel
    rank and all-reduce (parallel.py), and the threads it is
    built for (the GEMM templates bake the count in: a package built in a 1-thread Ray worker would
    run its GEMMs on one core in a process that has two)."""
    lm = sf.lm
    h = hashlib.sha256()
    src = Path(__file__).parent
    for name in ("aot.py", "graphs.py", "model.py", "cache.py", "parallel.py", "shm_all_reduce.cpp"):
        h.update((src / name).read_bytes())
    h.update(repr((torch.__version__, str(lm.dtype), lm.n_slots, lm.max_len, sf.lo, sf.hi, sf.exit_head, sf.fill,
                   sf.max_width, autotune(), lm.window, torch.get_num_threads(), lm.tp.rank, lm.tp.size,
                   lm.tp.shared)).encode())
    with torch.no_grad():
        for name, t in sorted(lm.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.flatten()[:8].float().numpy().tobytes())
            h.update(repr(float(t.float().sum())).encode())
    return h.hexdigest()[:24]


def build(sf, example, path: Path):
    """Export the step over `example` (a shape's buffers) and compile its package into `path`."""
    from torch.export import Dim

    lm = sf.lm
    R = Dim("rows", min=1, max=lm.n_slots) if lm.n_slots > 1 else None  # one slot: a static 1
    T = Dim("tokens", min=1, max=max(sf.max_width, 2))
    K = Dim("keys", min=1, max=lm.max_len)
    n = len(lm.cache.k)
    shapes = ({0: R, 1: T} if example[0] is not None else None, {1: R} if R else None, {0: T}, {0: K}, None,
              (None,) * n, (None,) * n)
    with torch.no_grad():
        program = torch.export.export(_Step(sf).eval(), inputs(sf, *example), dynamic_shapes=shapes, strict=False)
    opts = {"freezing": True}
    if autotune():
        # inductor's C++ GEMM templates where they time faster than oneDNN: on the few-row GEMMs of
        # decode and verify they skip oneDNN's per-call cost (bf16: about 5 us a GEMM against 30)
        opts.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=opts)
    tmp.replace(path)  # whole or absent, for a process that starts beside this one


def load_or_build(sf, example) -> tuple[object, bool]:
    """The step's compiled runner, and whether it was built now (False: loaded from the cache)."""
    path = cache_dir() / f"{_fingerprint(sf)}.pt2"
    built = not path.exists()
    if built:
        build(sf, example, path)
    runner = torch._inductor.aoti_load_package(str(path))
    return runner.loader.run, built
