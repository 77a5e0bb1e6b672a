"""The `s2d` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _sampling_flags(p: argparse.ArgumentParser):
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--mode", default="s2d", help="s2d | ar | fixed:E")


def _config_from_args(a):
    from s2d.core.config import EngineConfig, load_config

    if a.config:
        cfg = load_config(a.config)
    elif a.target_path and a.draft_path:
        cfg = EngineConfig.model_validate({"draft": {"path": a.draft_path},
                                           "targets": [{"name": a.target or "target", "path": a.target_path}]})
        a.target = a.target or "target"
    else:
        raise SystemExit("give --config FILE, or --target-path DIR and --draft-path DIR")
    return cfg.with_models(a.dtype, a.static_forward).on_device(a.device)


def cmd_generate(a):
    from pydantic import ValidationError

    from s2d.core.config import SamplingParams
    from s2d.core.engine import Engine, Request
    from s2d.core.request import RequestError

    cfg = _config_from_args(a)
    try:
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                seed=a.seed, stop=a.stop)
    except ValidationError as e:
        raise SystemExit(f"error: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    engine = Engine.from_config(cfg)
    try:
        req = Request(target=a.target, prompt=a.prompt, params=params, mode=a.mode, raw=a.raw)
        out = engine.start(req)
        for delta in engine.deltas(out):
            if not a.json:
                print(delta.text, end="", flush=True)
    except RequestError as e:
        raise SystemExit(f"error: {e}") from None
    result = out.result()
    if result.get("error"):
        raise SystemExit(f"error: {result['error']}")
    if a.json:
        print(json.dumps(result))
    else:
        s = result["stats"]
        print(f"\n[{result['finish_reason']}] {len(result['token_ids'])} tokens, MAT {s['mat']:.2f}, "
              f"exits {s['exit_histogram']}", file=sys.stderr)


def cmd_make_draft(a):
    from s2d.worker.draft import make_draft

    out = make_draft(a.from_, a.layers, [int(e) for e in a.exits.split(",")], a.out)
    print(f"sorted draft written to {out}")


def cmd_convert_gguf(a):
    from s2d.train.convert import convert_gguf

    print(f"checkpoint written to {convert_gguf(a.gguf, a.out, a.dtype)}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="s2d",
                                description="Sorted speculative decoding: one draft for a family of targets.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with S2D (or a baseline mode)")
    g.add_argument("--config", help="engine YAML config ('demo' for the bundled family)")
    g.add_argument("--target", help="target name in the config")
    g.add_argument("--target-path", help="one-off: target checkpoint folder")
    g.add_argument("--draft-path", help="one-off: sorted draft folder")
    g.add_argument("--device", help="put every model on this device (e.g. cuda:0)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="every model's dtype (default: the config's; auto: bf16 where the CPU has it)")
    g.add_argument("--static-forward", choices=["auto", "on", "eager", "off"], default="eager",
                   help="on compiles the steps first (minutes on a CPU, which one generation does not win back); "
                        "serving compiles once at startup (the config's static_forward)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    _sampling_flags(g)
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("make-draft", help="cut a sorted draft from a source checkpoint")
    m.add_argument("--from", dest="from_", required=True)
    m.add_argument("--layers", type=int, required=True)
    m.add_argument("--exits", required=True, help="comma-separated exit depths, e.g. 6,9,12")
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_make_draft)

    c = sub.add_parser("convert-gguf", help="GGUF -> safetensors checkpoint (default: SmolLM2-135M-Instruct)")
    c.add_argument("--gguf", default=None)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", default="float32")
    c.set_defaults(fn=cmd_convert_gguf)

    # Subcommands defined next to what they run.
    from s2d.tools import bench, tune
    from s2d.train import demo
    from s2d.train import soft as train

    for module in (train, demo, bench, tune):
        module.add_cli(sub)
    _add_client(sub)
    a = p.parse_args(argv)
    a.fn(a)


def cmd_client(a):
    import grpc

    from s2d.api.client import S2DClient

    c = S2DClient(a.address, a.application)
    try:
        if a.list:
            r = c.list_targets()
            print(json.dumps({"targets": list(r.targets), "draft_exits": list(r.draft_exits)}))
            return
        if not a.target or a.prompt is None:
            raise SystemExit("give --target NAME and --prompt TEXT (or --list)")
        kw = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                  stop=a.stop, mode=a.mode, raw=a.raw)
        if a.stream:
            for chunk in c.stream(a.target, a.prompt, **kw):
                print(chunk.text, end="", flush=True)
                last = chunk
            reason, n, mat = last.finish_reason, last.usage.completion_tokens, last.stats.mat
        else:
            r = c.generate(a.target, a.prompt, **kw)
            print(r.text, end="")
            reason, n, mat = r.finish_reason, r.usage.completion_tokens, r.stats.mat
        print(f"\n[{reason}] {n} tokens, MAT {mat:.2f}", file=sys.stderr)
    except grpc.RpcError as e:
        raise SystemExit(f"{e.code().name}: {e.details()}") from None
    finally:
        c.close()


def _add_client(sub):
    p = sub.add_parser("client", help="call a running s2d server over gRPC")
    p.add_argument("--address", default="127.0.0.1:9000")
    p.add_argument("--application", default=None, help="Ray Serve app name, when several run")
    p.add_argument("--target")
    p.add_argument("--prompt")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--raw", action="store_true")
    p.add_argument("--list", action="store_true", help="list the served targets")
    _sampling_flags(p)
    p.set_defaults(fn=cmd_client)


if __name__ == "__main__":
    main()
