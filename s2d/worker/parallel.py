"""Tensor parallelism (Megatron style) for a target split over N rank processes.

Each rank holds 1/N of every layer: q, k, v and gate, up are split by output (attention heads,
KV heads, MLP columns), o and down by input, so a layer needs one all-reduce after o and one after
down. The KV cache is split by KV heads with them. Embedding, norms and LM head are replicated.

The group is a torch.distributed group per target (NCCL on CUDA, gloo on CPU), formed over the
target's rank actors by deployments/ray_executor.py, which drives them in lockstep. On CPU, ranks on
one node all-reduce through shared memory instead (as vLLM's and SGLang's CPU backends do): a gloo
all-reduce between two processes here took 510-760 us, the shared-memory one 15-23 us
(docs/bench/tensor_parallel.md), and a layer needs two."""
from __future__ import annotations

import mmap
import os
import platform
import socket
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

GROUP_TIMEOUT_S = 60.0  # a collective waiting on a dead rank gives up after this

# name suffix -> the dimension split across ranks, and what its size counts (to refuse a bad N)
COLUMN = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads", "v_proj": "num_key_value_heads",
          "gate_proj": "intermediate_size", "up_proj": "intermediate_size"}  # split by output: weight dim 0, bias
ROW = {"o_proj": "num_attention_heads", "down_proj": "intermediate_size"}  # split by input: weight dim 1


class TensorParallel:
    """This process's place in its target's group: rank of size (1: not split), and how it
    all-reduces once joined (`join`)."""

    def __init__(self, rank: int = 0, size: int = 1, device: str = "cpu"):
        self.rank, self.size, self.device = rank, size, device
        self.shared: SharedMemoryReduce | None = None

    def part(self, n: int) -> int:
        return n // self.size

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs ([..., d], contiguous) over the ranks: in place
        when run, an op of the graph when traced into a compiled step (use the value returned)."""
        if self.size == 1:
            return x
        if torch.compiler.is_compiling():
            return shared_all_reduce(x) if self.shared is not None else funcol.all_reduce(x, "sum", dist.group.WORLD)
        if self.shared is not None:
            return self.shared(x)
        dist.all_reduce(x)
        return x

    def shard(self, name: str, t) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (t: a tensor, or safetensors' lazy slice, so
        that a rank reads only its part)."""
        shape = t.get_shape() if hasattr(t, "get_shape") else t.shape
        module, kind = name.split(".")[-2:]
        if self.size > 1 and module in COLUMN:
            n = shape[0] // self.size
            return t[self.rank * n:(self.rank + 1) * n]
        if self.size > 1 and module in ROW and kind == "weight":
            n = shape[1] // self.size
            return t[:, self.rank * n:(self.rank + 1) * n]
        return t[:]  # replicated (a row-parallel bias is added once, after the reduce)


def check_divides(size: int, cfg, field: str):
    """Refuse a tensor_parallel that does not split the model evenly, naming the config field."""
    if size <= 1:
        return
    for what in ("num_key_value_heads", "num_attention_heads", "intermediate_size"):
        n = getattr(cfg, what)
        if n % size:
            raise ValueError(f"{field}: {size} must divide the model's {what} ({n})")


def shared_memory_works(device: str) -> bool:
    """Whether ranks on one node can all-reduce through shared memory: on CPU, where stores are seen
    in program order (x86), which the flags rely on."""
    return device == "cpu" and platform.machine() in ("x86_64", "AMD64")


def listen(host: str = "127.0.0.1") -> dict:
    """Rank 0's rendezvous on `host` (its node's address), for every rank's `join`: host:port, and a
    shared-memory file."""
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return {"address": f"{host}:{port}", "shm": f"/dev/shm/s2d-tp-{host}-{port}-{os.getpid()}"}


def join(tp: TensorParallel, rendezvous: dict, shared: bool):
    """Join this process's target group (every rank calls it at once; it returns when all have).
    `shared`: every rank is on this node, so all-reduces go through shared memory."""
    global _shared
    if shared:
        tp.shared = _shared = SharedMemoryReduce(rendezvous["shm"], tp.rank, tp.size)
    backend = "nccl" if tp.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{rendezvous['address']}", rank=tp.rank, world_size=tp.size,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    if shared and tp.rank == 0:  # every rank has it mapped: the name can go
        os.unlink(rendezvous["shm"])


class SharedMemoryReduce:
    """An all-reduce among the ranks of one node over a shared file: each rank copies its part into
    its row of a buffer and raises its flag, waits (spinning: a wake-up costs more than the wait)
    until every flag is up, and sums the rows in rank order, so every rank gets the same bits. Two
    buffers alternate, so a rank can write the next round while a slower one still reads this one;
    a tensor past the buffer goes in pieces. Sums are taken in fp32 whatever the dtype."""

    CAPACITY = 1 << 18  # elements per rank and buffer (1 MiB)
    SPIN = 2000  # busy polls before each poll also yields the core

    def __init__(self, path: str, rank: int, size: int):
        nbytes = 64 * size + 2 * size * self.CAPACITY * 4
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < nbytes:
                os.ftruncate(fd, nbytes)
            self.mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.rank, self.seq = rank, 0
        self.flags = np.frombuffer(self.mm, np.int64, count=8 * size)[::8]  # one cache line each
        self.bufs = torch.frombuffer(self.mm, dtype=torch.float32, offset=64 * size,
                                     count=2 * size * self.CAPACITY).view(2, size, self.CAPACITY)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        for lo in range(0, flat.numel(), self.CAPACITY):
            part = flat[lo:lo + self.CAPACITY]
            self.seq += 1
            rows = self.bufs[self.seq & 1, :, :part.numel()]  # [size, n]
            rows[self.rank].copy_(part)
            self.flags[self.rank] = self.seq
            self._wait()
            part.copy_(rows.sum(0))
        return x

    def _wait(self):
        polls, deadline = 0, None
        while self.flags.min() < self.seq:
            polls += 1
            if polls > self.SPIN:
                os.sched_yield()
                if deadline is None:
                    deadline = time.monotonic() + GROUP_TIMEOUT_S
                elif polls % 1024 == 0 and time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel all-reduce: a rank did not answer in {GROUP_TIMEOUT_S} s")


_shared: SharedMemoryReduce | None = None  # this process's group's (a rank process is in one group)


@torch.library.custom_op("s2d::all_reduce", mutates_args=())
def shared_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The shared-memory all-reduce as an op, which a compiled step (an AOTInductor package) calls
    back into Python: about 8 us a call over the reduce itself (docs/bench/tensor_parallel.md)."""
    return _shared(x.clone())


@shared_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
