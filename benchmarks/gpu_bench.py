"""The GPU benchmark, in one command (needs CUDA; a benchmark, not a test):

    python benchmarks/gpu_bench.py [--hbm-tb-s 4.8] [--out docs/bench/gpu] [--skip-demo]

1. A 7B-shape bf16 Llama (Llama-2-7B's shape, random weights) on one GPU: the decode step (1 row,
   1 token) and a verify of 8 tokens, eager and through the static-shape forward (s2d/worker/graphs.py,
   CUDA graphs), at a 512-token context. Tokens/s, and the step against the HBM floor (the weights
   and the KV cache read once at --hbm-tb-s; 4.8 TB/s is the H200's HBM3e).
2. The same shape tensor-parallel at 1, 2 and 4 ranks, one GPU each, as many as the machine has
   (benchmarks/tp_bench.py): decode and verify through CUDA graphs with NCCL all-reduces.
3. The bundled demo family on the GPU: s2d against ar with CUDA graphs, in the same run, on
   held-out code and Spec-Bench (`s2d bench` with --device cuda).
Aims (issue "Engine speed"): decode step <= 1.3x the floor; verify of 8 <= 1.15x a decode step;
demo-l s2d >= 1.5x the CUDA-graph ar; a tensor_parallel 2 decode <= 0.6x tensor_parallel 1's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from s2d.tools.bench import median_ms

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


@torch.inference_mode()
def seven_b(hbm_tb_s: float, context: int = 512) -> list[dict]:
    from transformers import LlamaConfig

    from s2d.worker.graphs import attach
    from s2d.worker.model import CausalLM

    cfg = LlamaConfig(**SHAPE_7B)
    with torch.device("meta"):
        lm = attach(CausalLM(cfg, n_slots=1, max_len=2048, dtype=torch.bfloat16, device="cuda",
                             static_forward="on"))
    state = {k: torch.randn(v.shape, dtype=torch.bfloat16, device="cuda") * 0.02 for k, v in lm.state_dict().items()}
    lm.load_weights(state)
    del state
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    lm(torch.zeros(1, context, dtype=torch.long, device="cuda"), lm.batch([0], [0], [context]))  # fill the cache
    rows = []
    for T in (1, 8):
        toks = [[0] * T]
        eager = median_ms(lambda: lm.logits(lm.run_layers(lm.embed(torch.tensor(toks, device="cuda")),
                                                          lm.batch([0], [context], [T]))))
        # logits inside
        graph = median_ms(lambda: lm.static.run([0], [context], [T], torch.tensor(toks, device="cuda")))
        kv = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (context + T)
              * (cfg.hidden_size // cfg.num_attention_heads) * 2)
        floor = 1000 * (weights + kv) / (hbm_tb_s * 1e12)
        rows.append({"what": "decode 1 token" if T == 1 else f"verify {T} tokens", "eager_ms": round(eager, 3),
                     "graph_ms": round(graph, 3), "floor_ms": round(floor, 3), "x_floor": round(graph / floor, 3),
                     "tok_s": round(1000 / graph, 1) if T == 1 else None})
    rows[1]["x_decode"] = round(rows[1]["graph_ms"] / rows[0]["graph_ms"], 3)
    return rows


def demo(out: Path) -> list[dict]:
    from s2d.core.config import load_config
    from s2d.core.engine import Engine
    from s2d.tools.bench import find_spec_bench, fits_context, heldout_code, overall, run_bench, spec_bench_prompts

    cfg = load_config("demo").on_device("cuda")
    engine = Engine.from_config(cfg)
    tasks = {}
    sb = find_spec_bench()
    if sb:
        tasks.update(spec_bench_prompts(sb, 3, fits_context(engine, "demo-l", 64)))
    tasks["code"] = heldout_code(Path(cfg.base_dir), 4)
    rows = run_bench(engine, [t.name for t in cfg.targets], ["ar", "s2d"], [0.0, 1.0], tasks, 64)
    (out / "demo_bench.json").write_text(json.dumps(rows, indent=1))
    return overall(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hbm-tb-s", type=float, default=4.8)
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--skip-demo", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    steps = seven_b(a.hbm_tb_s)
    print("| 7B-shape bf16 | eager ms | CUDA graph ms | HBM floor ms | graph / floor | tok/s |\n"
          "|---|---|---|---|---|---|")
    for r in steps:
        print(f"| {r['what']} | {r['eager_ms']} | {r['graph_ms']} | {r['floor_ms']} | {r['x_floor']}x | "
              f"{r['tok_s'] or ''} |")
    print(f"\nverify of 8 / decode step (graphs): {steps[1]['x_decode']}x\n")
    import tp_bench  # beside this file

    tp_bench.main(["--model", "7b", "--device", "cuda", "--sizes", "1,2,4"])
    print()
    summary = [] if a.skip_demo else demo(out)
    if summary:
        print("| target | T | method | tok/s | speedup | MAT |\n|---|---|---|---|---|---|")
        for r in summary:
            print(f"| {r['target']} | {r['temperature']} | {r['mode']} | {r['tokens_per_s']} | {r['speedup']}x | "
                  f"{r['mat']} |")
    (out / "gpu_bench.json").write_text(json.dumps({"seven_b": steps, "demo": summary}, indent=1))


if __name__ == "__main__":
    main()
