"""Tensor parallelism (Megatron style) for a target split over N rank processes.

Each rank holds 1/N of every layer: q, k, v and gate, up are split by output (attention heads,
KV heads, MLP columns), o and down by input, so a layer needs one all-reduce after o and one after
down. The KV cache is split by KV heads with them. Embedding, norms and LM head are replicated.

The group is a torch.distributed group per target (NCCL on CUDA, gloo on CPU), formed over the
target's rank actors by deployments/ray_executor.py, which drives them in lockstep. On CPU, ranks on
one node all-reduce through shared memory instead (as vLLM's and SGLang's CPU backends do): a gloo
all-reduce between two processes here took about 300 us, the shared-memory one a few
(docs/bench/tensor_parallel.md), and a layer needs two. That all-reduce is a C++ torch op
(shm_all_reduce.cpp, built on first use), so a rank's compiled steps call it without Python."""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

log = logging.getLogger("s2d.worker.parallel")
GROUP_TIMEOUT_S = 300.0  # forming a group (ranks load and build at their own pace), and a gloo collective
SHM_TIMEOUT_S = 60.0  # a shared-memory all-reduce waiting on a dead rank gives up after this
SHM_CAPACITY = 1 << 18  # floats per rank and buffer (1 MiB); a larger tensor goes in pieces

# name suffix -> the dimension split across ranks, and what its size counts (to refuse a bad N)
COLUMN = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads", "v_proj": "num_key_value_heads",
          "gate_proj": "intermediate_size", "up_proj": "intermediate_size"}  # split by output: weight dim 0, bias
ROW = {"o_proj": "num_attention_heads", "down_proj": "intermediate_size"}  # split by input: weight dim 1


class TensorParallel:
    """This process's place in its target's group: rank of size (1: not split), and how it
    all-reduces once joined (`join`)."""

    def __init__(self, rank: int = 0, size: int = 1, device: str = "cpu"):
        self.rank, self.size, self.device = rank, size, device
        self.shared = False  # all-reduces through shared memory

    def part(self, n: int) -> int:
        return n // self.size

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a row-parallel layer's partial outputs (use the value returned:
        in place when run eagerly through torch.distributed, a new tensor otherwise)."""
        if self.size == 1:
            return x
        if self.shared:
            return torch.ops.s2d_shm.all_reduce(x)
        if torch.compiler.is_compiling():  # traced into a compiled step: a functional collective
            return funcol.all_reduce(x, "sum", dist.group.WORLD)
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
    """Whether ranks on one node can all-reduce through shared memory: on CPU, once the op is built
    (about 30 s the first time, then cached by torch: ~/.cache/torch_extensions). Without a C++
    compiler the group uses gloo, with a warning."""
    if device != "cpu":
        return False
    if not hasattr(torch.ops.s2d_shm, "all_reduce"):
        from torch.utils.cpp_extension import load

        try:
            load("s2d_shm_all_reduce", [str(Path(__file__).with_name("shm_all_reduce.cpp"))],
                 extra_cflags=["-O3"], is_python_module=False)
        except Exception as e:  # noqa: BLE001 - the group still forms, over gloo
            log.warning("s2d: the shared-memory all-reduce did not build (%s); tensor-parallel ranks use gloo", e)
            return False
        torch.library.register_fake("s2d_shm::all_reduce")(torch.empty_like)
    return True


def listen(host: str = "127.0.0.1") -> dict:
    """Rank 0's rendezvous on `host` (its node's address), for every rank's `join`: host:port, and a
    shared-memory file."""
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return {"address": f"{host}:{port}", "shm": f"/dev/shm/s2d-tp-{host}-{port}-{os.getpid()}"}


def join(tp: TensorParallel, rendezvous: dict, shared: bool):
    """Join this process's target group (every rank calls it at once; it returns when all have).
    `shared`: every rank is on this node and `shared_memory_works`, so all-reduces go through it."""
    if shared:
        torch.ops.s2d_shm.attach(rendezvous["shm"], tp.rank, tp.size, SHM_CAPACITY, SHM_TIMEOUT_S)
        tp.shared = True
    backend = "nccl" if tp.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{rendezvous['address']}", rank=tp.rank, world_size=tp.size,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    if shared and tp.rank == 0:  # every rank has it mapped: the name can go
        os.unlink(rendezvous["shm"])
