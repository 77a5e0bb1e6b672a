"""The bundled demo family, rebuilt by `s2d build-demo`: a BPE tokenizer and three Llama-style
targets (demo-s, demo-m, demo-l, standing for 7B/13B/70B) trained on CPython's standard library
source and, where given, Python's documentation (English prose, so that English prompts such as
Spec-Bench's are not out of distribution), and one sorted draft (first 3 layers of demo-s, exits
1/2/3) SoFT-trained for all of them."""
from __future__ import annotations

import json
import random
import shutil
import sysconfig
import time
from pathlib import Path

import yaml

DEMO_DIR = Path(__file__).parents[1] / "demo"

# name: (layers, hidden, heads). Each is about twice the previous in parameters and step cost.
TARGETS = {"demo-s": (4, 128, 4), "demo-m": (8, 224, 4), "demo-l": (12, 256, 4)}
DRAFT = {"source": "demo-s", "layers": 3, "exits": [1, 2, 3]}
# Larger targets get more steps, so that held-out loss falls with size on a CPU budget. The corpus
# is the whole stdlib (not only its top level), so no target sees a file twice.
RECIPE = {"vocab": 4096, "seq_len": 256, "batch_size": 16, "draft_steps": 320, "lr": 2e-3,
          "target_steps": {"demo-s": 320, "demo-m": 640, "demo-l": 800},
          "draft_lr": 1e-3, "kd_weight": 0.5, "heldout_fraction": 0.05, "seed": 0}
# The same family trained longer on one GPU (`--recipe gpu`, 194 s on one H200): batch 64 and 2-4
# epochs of the ~6M-token corpus, bf16 autocast, held-out loss every 250 steps to show it does not overfit.
GPU = {"batch_size": 64, "target_steps": {"demo-s": 740, "demo-m": 1100, "demo-l": 1500}, "draft_steps": 1500,
       "dtype": "bfloat16", "eval_every": 250}
QUICK = {"vocab": 512, "seq_len": 64, "batch_size": 4, "target_steps": {n: 3 for n in TARGETS}, "draft_steps": 3,
         "files": 30}


# Third-party packages differ per machine; tests and IDLE are large and unlike library code.
# The demo models are base models (trained on Python source and its docs), not chat models: their
# prompts are text to continue (plain_prompts), and this template only lets chat clients reach them,
# each message as "Role: text", then "Assistant:".
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}Assistant:{% endif %}")
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def corpus_files(root: Path, pattern: str = "*.py", limit: int | None = None) -> list[Path]:
    """Files under root (recursively, outside SKIP_DIRS), large enough to be real text."""
    files = sorted(p for p in root.rglob(pattern)
                   if not SKIP_DIRS & set(p.relative_to(root).parts) and p.stat().st_size > 2000)
    return files[:limit] if limit else files


def add_plain_chat_template(tokenizer_dir: Path):
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"chat_template": PLAIN_CHAT_TEMPLATE}, indent=2) + "\n")


def split_files(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    rng = random.Random(seed)
    held = sorted(rng.sample(files, max(1, int(len(files) * fraction))))
    return [f for f in files if f not in held], held


def model_card(name: str, info: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.items())
    return (f"# {name}\n\nPart of the s2d demo family. Rebuild: `{info['rebuild']}`.\n\n"
            f"| field | value |\n|---|---|\n{rows}\n")


def build_demo(out: str | Path = DEMO_DIR, corpus: str | Path | None = None, docs: str | Path | None = None,
               quick: bool = False, draft_only: bool = False, progress: bool = True, recipe_name: str = "cpu") -> dict:
    from transformers import AutoTokenizer

    from s2d.train.soft import TrainArgs, pack, train
    from s2d.train.tiny import llama_config, save_random_model, train_tokenizer
    from s2d.worker.draft import make_draft

    recipe = {**RECIPE, **(GPU if recipe_name == "gpu" else {}), **(QUICK if quick else {})}
    out, work = Path(out), Path(out) / ".work"
    rebuild = ("s2d build-demo" + (" --quick" if quick else "") + (" --recipe gpu" if recipe_name == "gpu" else "")
               + (f" --corpus {corpus}" if corpus else "")
               + (" --docs <python3.11-doc>/usr/share/doc/python3.11/html/_sources" if docs else ""))
    corpus = Path(corpus or sysconfig.get_paths()["stdlib"])
    code, held = split_files(corpus_files(corpus, limit=recipe.get("files")), recipe["heldout_fraction"],
                             recipe["seed"])
    prose, held_prose = split_files(corpus_files(Path(docs), "*.txt", recipe.get("files")), recipe["heldout_fraction"],
                                    recipe["seed"]) if docs else ([], [])
    out.mkdir(parents=True, exist_ok=True)
    # the bench cuts its code-completion prompts from these (paths relative to the stdlib)
    (out / "heldout_files.txt").write_text("".join(f"{f.relative_to(corpus).as_posix()}\n" for f in held))
    fingerprint = {"recipe": recipe, "code_files": len(code), "doc_files": len(prose)}
    if _read(out / "build.json").get("fingerprint") != fingerprint and not draft_only:
        for name in (*TARGETS, "demo-draft"):  # another recipe or corpus: build anew
            shutil.rmtree(out / name, ignore_errors=True)
    t0 = time.perf_counter()
    tok_dir = work / "tokenizer"
    texts = [f.read_text(errors="ignore") for f in code + prose]
    if not (out / "demo-s" / "tokenizer.json").exists():
        train_tokenizer(texts, recipe["vocab"], tok_dir)
    else:  # a target is already built: keep its tokenizer (the family shares one)
        tok_dir = out / "demo-s"
    add_plain_chat_template(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    data = pack(tok, texts, recipe["seq_len"])
    eval_data = pack(tok, [f.read_text(errors="ignore") for f in held + held_prose], recipe["seq_len"])
    common = {"seq_len": recipe["seq_len"], "batch_size": recipe["batch_size"], "seed": recipe["seed"],
              "progress": progress, "eval_every": recipe.get("eval_every", 10**9), "save_every": 10**9,
              "dtype": recipe.get("dtype", "float32"),
              "save_dtype": "bfloat16" if not quick else "float32"}
    cards = {}
    for name, (layers, hidden, heads) in TARGETS.items():
        steps = recipe["target_steps"][name]
        s = _built(out / name, steps)
        if s is None and draft_only:
            raise FileNotFoundError(f"--draft-only needs the built target {out / name}")
        if s is None:  # not built yet with this recipe's steps: train it
            init = work / f"{name}-init"
            save_random_model(llama_config(len(tok), layers, hidden, heads, max_pos=1024), init, recipe["seed"],
                              tok_dir)
            s = train(init, data, TrainArgs(out=str(out / name), max_steps=steps, lr=recipe["lr"], **common),
                      eval_data, tok)
        cards[name] = {"shape": f"{layers} layers x {hidden}", "params": _params(out / name), "steps": s["steps"],
                       "train_tokens": s["tokens"], "final_train_loss": s["final_loss"], "heldout_loss": s["eval_loss"]}
    src = out / DRAFT["source"]
    init = make_draft(src, DRAFT["layers"], DRAFT["exits"], work / "draft-init")
    s = train(init, data, TrainArgs(out=str(out / "demo-draft"), max_steps=recipe["draft_steps"], lr=recipe["draft_lr"],
                                    kd_target=str(out / "demo-l"), kd_weight=recipe["kd_weight"], **common),
              eval_data, tok)
    cards["demo-draft"] = {"shape": f"first {DRAFT['layers']} layers of {DRAFT['source']}, exits {DRAFT['exits']}",
                           "params": _params(out / "demo-draft"), "steps": s["steps"], "train_tokens": s["tokens"],
                           "objective": f"SoFT + {recipe['kd_weight']} x KL to demo-l",
                           "final_train_loss": s["final_loss"], "heldout_loss": s["eval_loss"]}
    for name, info in cards.items():
        info.update(data=f"CPython stdlib {corpus} *.py ({len(code)} files; {len(held)} held out, heldout_files.txt)"
                    + (f" + Python docs *.rst.txt ({len(prose)} files; {len(held_prose)} held out)" if docs else ""),
                    tokenizer=f"byte-level BPE, {len(tok)} tokens", rebuild=rebuild, trained_on=_hardware(recipe))
        (out / name / "README.md").write_text(model_card(name, info))
    if not (out / "demo.yaml").exists() or quick:
        (out / "demo.yaml").write_text(yaml.safe_dump(default_config(), sort_keys=False))
    shutil.rmtree(work, ignore_errors=True)
    summary = {"seconds": round(time.perf_counter() - t0, 1), "fingerprint": fingerprint, "models": cards}
    (out / "build.json").write_text(json.dumps(summary, indent=1))
    return summary


def _hardware(recipe: dict) -> str:
    import platform

    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return f"{where}, {'bf16 autocast' if recipe.get('dtype') == 'bfloat16' else 'float32'}"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _built(path: Path, steps: int) -> dict | None:
    """The training summary of a target already trained with `steps` steps, else None."""
    log = path / "train_log.json"
    if log.exists():
        summary = json.loads(log.read_text())["summary"]
        if summary["steps"] == steps:
            return summary
    return None


def _params(path: Path) -> str:
    from safetensors import safe_open

    n = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            n += sum(_prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return f"{n / 1e6:.2f}M"


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def default_config() -> dict:
    return {
        # float32 on every device, also where `auto` would pick bf16: in bf16 a (k+1)-token verify and
        # a 1-token decode round differently, and at near-ties greedy S2D then leaves the target's own
        # greedy output. On this project's CPU bf16 was no faster anyway (`benchmarks/step_costs.py
        # --dtype bfloat16` against the configured run).
        "draft": {"path": "demo-draft", "max_seqs": 32, "dtype": "float32"},
        "targets": [{"name": n, "path": n, "plain_prompts": True, "max_seqs": 32, "max_seq_len": 1024,
                     "dtype": "float32",
                     "profile": {"thresholds": [0.5, 0.5, 0.0], "k_max": 5, "stop_threshold": 0.0}} for n in TARGETS],
        "limits": {"max_prompt_tokens": 768, "max_new_tokens": 256, "max_waiting": 128},
    }


def add_cli(sub):
    p = sub.add_parser("build-demo", help="rebuild the bundled demo family from CPython's stdlib source")
    p.add_argument("--out", default=str(DEMO_DIR))
    p.add_argument("--corpus", default=None, help="a folder of .py files (default: this Python's stdlib)")
    p.add_argument("--docs", default=None, help="English prose: the _sources folder of Debian's python3.11-doc "
                   "(apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb DIR)")
    p.add_argument("--quick", action="store_true", help="a few steps of tiny models (smoke test)")
    p.add_argument("--draft-only", action="store_true", help="retrain only the draft against the existing targets")
    p.add_argument("--recipe", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: about an hour on 2 cores; gpu: 2-4 epochs at batch 64, minutes on one GPU")
    p.set_defaults(fn=lambda a: print(json.dumps(build_demo(a.out, a.corpus, a.docs, a.quick, a.draft_only,
                                                            recipe_name=a.recipe), indent=1)))
