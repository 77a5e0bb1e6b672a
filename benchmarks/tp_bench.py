"""Step costs of a target split over tensor-parallel ranks, against the unsplit target on the same
total cores (CPU) or one GPU per rank (CUDA), and the all-reduce time per layer (a benchmark, not a
test):

    python benchmarks/tp_bench.py                                   # demo-l on this CPU, 2 cores
    python benchmarks/tp_bench.py --model 7b --device cuda --sizes 1,2,4

Each configuration runs its ranks as processes in lockstep (as the cell's rank actors run) over
the static-shape step (s2d/worker/graphs.py) at a 256-token context: a decode (1 row, 1 token), a
verify of 6 tokens, and a decode of 8 rows. On CPU each runs compiled (AOTInductor packages,
the all-reduce an op in them) and eagerly; tensor_parallel 2 all-reduces through shared
memory, and eagerly through gloo (a split over nodes runs so: parallel.py). Rank 0 times each
step; the other ranks wait on it in the collectives. Aims (issue 20): on CPU, tensor_parallel 2
within 1.5x of tensor_parallel 1; on a GPU, a 7B-shape decode at tensor_parallel 2 at most 0.6x
of tensor_parallel 1's.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.multiprocessing as mp

from s2d.core.engine import warm_up_target
from s2d.tools.bench import median_ms
from s2d.worker.graphs import attach
from s2d.worker.model import CausalLM, load_hf_config
from s2d.worker.parallel import TensorParallel, join, listen, shared_memory_works

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
CONTEXT = 256
STEPS = [("decode", 1, 1), ("verify 6", 1, 6), ("decode x8", 8, 1)]  # (what, rows, tokens)


def load(args, tp: TensorParallel, static: str) -> CausalLM:
    dtype = getattr(torch, args.dtype)
    if args.model == "7b":
        from transformers import LlamaConfig

        with torch.device("meta"):
            lm = CausalLM(LlamaConfig(**SHAPE_7B), 8, CONTEXT + 64, dtype, args.device, static, tp)
        # random weights of this rank's shapes: the timings do not depend on the values
        lm.load_weights({k: torch.randn(v.shape, dtype=dtype) * 0.02 for k, v in lm.state_dict().items()})
        return attach(lm)
    path = os.path.join(os.path.dirname(__file__), "..", "s2d", "demo", args.model)
    return attach(CausalLM.from_pretrained(path, 8, CONTEXT + 64, dtype, args.device, static_forward=static, tp=tp))


@torch.inference_mode()
def rank_main(rank: int, size: int, args, static: str, transport: str, rendezvous: dict, queue):
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, args.cores // size))
    tp = TensorParallel(rank, size, f"cuda:{rank}" if cuda else "cpu")
    lm = load(args, tp, static)
    if size > 1:
        join(tp, rendezvous, transport == "shm" and shared_memory_works(tp.device))
    warm_up_target(args.model, lm)
    dev = lm.device
    for slot in range(8):  # every slot holds a CONTEXT-token prefix
        lm(torch.zeros(1, CONTEXT, dtype=torch.long, device=dev), lm.batch([slot], [0], [CONTEXT]))
    row = {}
    for what, B, T in STEPS:
        toks = torch.zeros(B, T, dtype=torch.long, device=dev)
        row[what] = median_ms(lambda: lm.static.run(list(range(B)), [CONTEXT] * B, [T] * B, toks), args.reps)
    h = torch.zeros(1, 1, lm.cfg.hidden_size, dtype=lm.dtype, device=dev)
    row["head_ms"] = median_ms(lambda: lm.head(h), args.reps)  # what a vocab-parallel head could split
    if size > 1:  # one all-reduce of a decode's hidden state
        row["reduce_us"] = 1000 * median_ms(lambda: tp.reduce(h), 200)
    if rank == 0:
        queue.put(row)


def run(args, size: int, static: str, transport: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rendezvous = listen()
    procs = [ctx.Process(target=rank_main, args=(r, size, args, static, transport, rendezvous, queue))
             for r in range(size)]
    for p in procs:
        p.start()
    row = queue.get()
    for p in procs:
        p.join()
    return row


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo-l", help="a bundled demo target, or 7b (random weights)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU: cores shared by all ranks")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    cfgs = []  # (tensor_parallel, static mode, transport)
    for n in map(int, args.sizes.split(",")):
        if args.device == "cuda":
            if n <= torch.cuda.device_count():
                cfgs.append((n, "on", "nccl"))
        elif n == 1:
            cfgs += [(1, "on", "-"), (1, "eager", "-")]
        else:
            cfgs += [(n, "on", "shm"), (n, "eager", "shm"), (n, "eager", "gloo")]
    if args.model != "7b":
        cfg = load_hf_config(os.path.join(os.path.dirname(__file__), "..", "s2d", "demo", args.model))
        print(f"{args.model}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")
    print(f"{args.model} {args.dtype} on {args.device}, context {CONTEXT}, {args.cores} cores\n")
    print("| tensor_parallel | step | all-reduce | " + " | ".join(f"{w} ms (x tp1)" for w, *_ in STEPS)
          + " | all-reduce us | LM head ms |\n|---|---|---|" + "---|" * (len(STEPS) + 2), flush=True)
    base = {}
    for n, static, transport in cfgs:  # tensor_parallel 1 first: the base of the ratios
        r = run(args, n, static, transport)
        if n == 1:
            base = {w: min(base.get(w, r[w]), r[w]) for w, *_ in STEPS}
        cells = " | ".join(f"{r[w]:.3f} ({r[w] / base[w]:.2f}x)" for w, *_ in STEPS)
        step = {"on": "compiled" if args.device == "cpu" else "CUDA graph", "eager": "static, eager"}[static]
        print(f"| {n} | {step} | {transport} | {cells} | {r.get('reduce_us', 0):.1f} | {r['head_ms']:.3f} |",
              flush=True)
    print("\n(x tp1: against the fastest tensor_parallel 1 step of the same shape above it; a layer all-reduces "
          "twice; LM head: eager, a decode's, on every rank when replicated)")


if __name__ == "__main__":
    main()
