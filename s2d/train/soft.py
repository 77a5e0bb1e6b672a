"""SoFT training of a sorted draft (cross-entropy at every exit, averaged over the exits), the same
trainer with one exit for plain LM training from scratch, and tokenizer training. Built on
accelerate, so one command runs on CPU, one GPU or several (`accelerate launch`)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

TEXT_SUFFIXES = {".txt", ".py", ".rst", ".md"}


@dataclass
class TrainArgs:
    out: str
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.04  # fraction of the steps
    weight_decay: float = 0.01
    max_steps: int | None = None
    epochs: float = 1.0
    dtype: str = "float32"  # or bfloat16 (autocast)
    save_dtype: str = "float32"
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # stop (checkpointed) after this step, as an interruption would
    kd_target: str | None = None  # distil from this target's logits (optional, beyond the paper)
    kd_weight: float = 0.0
    progress: bool = True


# -- data ----------------------------------------------------------------------------------------
def read_documents(paths: list[str | Path]) -> list[str | list[dict]]:
    """Plain text files (or folders of them), JSONL of {"text"} or of {"messages"}."""
    docs = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES | {".jsonl"}) if p.is_dir() else [p]
        for f in files:
            if f.suffix == ".jsonl":
                for line in f.read_text(errors="ignore").splitlines():
                    if line.strip():
                        row = json.loads(line)
                        docs.append(row["messages"] if "messages" in row else row["text"])
            else:
                docs.append(f.read_text(errors="ignore"))
    if not docs:
        raise ValueError(f"data: no documents found in {[str(p) for p in paths]}")
    return docs


def encode_document(tokenizer, doc) -> tuple[list[int], list[int]]:
    """Token ids and a loss mask: every token of text; only assistant tokens of a chat."""
    if isinstance(doc, str):
        ids = tokenizer(doc)["input_ids"]
        return ids, [1] * len(ids)
    ids, mask = [], []
    for i, m in enumerate(doc):
        before = tokenizer.apply_chat_template(doc[:i], tokenize=True, add_generation_prompt=m["role"] == "assistant",
                                               return_dict=False) if i else []
        after = tokenizer.apply_chat_template(doc[: i + 1], tokenize=True, return_dict=False)
        ids += after[len(ids):]
        is_answer = m["role"] == "assistant"
        mask += [0] * (len(before) - len(mask)) + [int(is_answer)] * (len(after) - max(len(before), len(mask)))
    return ids, mask[: len(ids)]


def pack(tokenizer, docs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents joined with EOS and cut into windows of seq_len + 1 tokens: (ids, loss mask)."""
    ids, mask = [], []
    eos = tokenizer.eos_token_id
    for d in docs:
        i, m = encode_document(tokenizer, d)
        ids += i + [eos]
        mask += m + [1]
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(f"data: {len(ids)} tokens is less than one window of {seq_len + 1}")
    ids_t = torch.tensor(ids[: n * seq_len + 1])
    mask_t = torch.tensor(mask[: n * seq_len + 1])
    starts = torch.arange(n) * seq_len
    idx = starts[:, None] + torch.arange(seq_len + 1)
    return ids_t[idx], mask_t[idx]


# -- losses --------------------------------------------------------------------------------------
def exit_logits(model, input_ids, exits: list[int]) -> list[torch.Tensor]:
    """Logits at every exit, through the shared final norm and LM head."""
    out = model(input_ids=input_ids, output_hidden_states=True)  # through the (possibly DDP) wrapper
    base = getattr(model, "module", model)
    n = base.config.num_hidden_layers
    return [out.logits if e == n else base.lm_head(base.model.norm(out.hidden_states[e])) for e in exits]


def soft_loss(logits: list[torch.Tensor], labels, mask, teacher=None,
              kd_weight=0.0) -> tuple[torch.Tensor, list[float]]:
    """Mean over exits of the masked next-token cross-entropy (+ kd_weight x KL to a teacher)."""
    losses, per_exit = [], []
    m = mask.float()
    for lg in logits:
        ce = F.cross_entropy(lg.float().flatten(0, 1), labels.flatten(), reduction="none")
        ce = (ce * m.flatten()).sum() / m.sum().clamp_min(1)
        per_exit.append(ce.item())
        if teacher is not None and kd_weight:
            kl = F.kl_div(F.log_softmax(lg.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                          reduction="none").sum(-1)
            ce = ce + kd_weight * (kl * m).sum() / m.sum().clamp_min(1)
        losses.append(ce)
    return torch.stack(losses).mean(), per_exit


# -- the loop ------------------------------------------------------------------------------------
def train(model_dir: str | Path, data: tuple[torch.Tensor, torch.Tensor], args: TrainArgs,
          eval_data: tuple[torch.Tensor, torch.Tensor] | None = None, tokenizer=None) -> dict:
    """Train the checkpoint in model_dir on packed windows; write the result to args.out."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(mixed_precision="bf16" if args.dtype == "bfloat16" else "no",
                      gradient_accumulation_steps=args.grad_accum)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    exits = list(getattr(model.config, "s2d_exits", None) or [model.config.num_hidden_layers])
    teacher = None
    if args.kd_target:
        teacher = AutoModelForCausalLM.from_pretrained(args.kd_target, dtype=torch.float32).eval().requires_grad_(False)
        teacher.to(acc.device)
    ids, mask = data
    per_step = args.batch_size * args.grad_accum
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(ids) / per_step))
    warm = max(1, int(args.warmup * steps))

    def lr_at(step):  # linear warmup, cosine decay to min_lr_ratio
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    # The schedule counts optimizer steps itself, so it is not prepared (accelerate would step it once per
    # process); it is registered so checkpoints carry it.
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)

    ckpt, start, log = out / "checkpoint", 0, []
    if args.resume and (ckpt / "state.json").exists():
        acc.load_state(str(ckpt))
        state = json.loads((ckpt / "state.json").read_text())
        start, log = state["step"], state["log"]
        acc.print(f"resumed from {ckpt} at step {start}")

    def batch_at(step: int, micro: int):
        # The data order is a function of the step, so a resumed run sees exactly what an uninterrupted one would.
        epoch, offset = divmod(step * per_step + micro * args.batch_size, len(ids))
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        sel = perm[torch.arange(offset, offset + args.batch_size) % len(ids)]
        sel = sel[acc.process_index::acc.num_processes]
        return ids[sel].to(acc.device), mask[sel].to(acc.device)

    bar = tqdm(total=steps, initial=start, disable=not (args.progress and acc.is_main_process), desc="train",
               unit="step")
    t0, seen = time.perf_counter(), 0
    model.train()
    for step in range(start, steps):
        for micro in range(args.grad_accum):
            x, m = batch_at(step, micro)
            with acc.accumulate(model), acc.autocast():
                logits = exit_logits(model, x[:, :-1], exits)
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=x[:, :-1]).logits
                loss, per_exit = soft_loss(logits, x[:, 1:], m[:, 1:], t_logits, args.kd_weight)
                acc.backward(loss)
                if acc.sync_gradients:  # the last micro-batch of an optimizer step
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
            seen += x.numel()
        tps = seen * acc.num_processes / (time.perf_counter() - t0)
        bar.set_postfix({f"exit{e}": f"{v:.3f}" for e, v in zip(exits, per_exit)} | {"tok/s": f"{tps:,.0f}"})
        bar.update(1)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, "loss": dict(zip(map(str, exits), per_exit)), "lr": sched.get_last_lr()[0],
                        "tokens_per_s": round(tps)})
        if eval_data is not None and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            log.append({"step": step + 1, "eval_loss": evaluate(acc.unwrap_model(model), eval_data, exits, args)})
            model.train()
        interrupted = args.stop_after is not None and step + 1 == args.stop_after
        if ((step + 1) % args.save_every == 0 and step + 1 < steps) or interrupted:
            acc.save_state(str(ckpt))
            (ckpt / "state.json").write_text(json.dumps({"step": step + 1, "log": log}))
        if interrupted:
            bar.close()
            return {"steps": step + 1, "interrupted": True}
    bar.close()
    final = acc.unwrap_model(model)
    summary = {"steps": steps, "exits": exits, "tokens": steps * per_step * args.seq_len, "args": asdict(args),
               "final_loss": next((e["loss"] for e in reversed(log) if "loss" in e), None),
               "eval_loss": next((e["eval_loss"] for e in reversed(log) if "eval_loss" in e), None)}
    if acc.is_main_process:
        final.to(getattr(torch, args.save_dtype)).save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        else:
            from s2d.worker.draft import copy_tokenizer

            copy_tokenizer(model_dir, out)
        (out / "train_log.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    return summary


@torch.no_grad()
def evaluate(model, data, exits, args, max_windows: int = 256) -> dict[str, float]:
    """Held-out loss per exit."""
    model.eval()
    ids, mask = data[0][:max_windows], data[1][:max_windows]
    dev = next(model.parameters()).device
    totals = torch.zeros(len(exits))
    n = 0
    for i in range(0, len(ids), args.batch_size):
        x, m = ids[i: i + args.batch_size].to(dev), mask[i: i + args.batch_size].to(dev)
        _, per_exit = soft_loss(exit_logits(model, x[:, :-1], exits), x[:, 1:], m[:, 1:])
        totals += torch.tensor(per_exit) * len(x)
        n += len(x)
    return {str(e): round(float(t / n), 4) for e, t in zip(exits, totals)}


# -- CLI -----------------------------------------------------------------------------------------
def _train_flags(p):
    p.add_argument("--data", nargs="+", required=True, help="text files/folders, JSONL of text or of chat messages")
    p.add_argument("--eval-data", nargs="*", default=None)
    p.add_argument("--out", required=True)
    for name, typ in [("seq-len", int), ("batch-size", int), ("grad-accum", int), ("lr", float), ("warmup", float),
                      ("weight-decay", float), ("max-steps", int), ("epochs", float), ("eval-every", int),
                      ("save-every", int), ("seed", int)]:
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")


def _args_from(a) -> TrainArgs:
    kw = {k: v for k, v in vars(a).items() if k in TrainArgs.__dataclass_fields__ and v is not None}
    return TrainArgs(**kw)


def _run(model_dir, a):
    from transformers import AutoTokenizer

    args = _args_from(a)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    data = pack(tok, read_documents(a.data), args.seq_len)
    eval_data = pack(tok, read_documents(a.eval_data), args.seq_len) if a.eval_data else None
    print(json.dumps(train(model_dir, data, args, eval_data), indent=1))


def cmd_train_draft(a):
    from s2d.worker.draft import make_draft

    src = a.draft
    if src is None:
        if not (a.from_ and a.layers and a.exits):
            raise SystemExit("give --draft DIR, or --from TARGET --layers L --exits E1,E2,...")
        src = make_draft(a.from_, a.layers, [int(e) for e in a.exits.split(",")], Path(a.out) / "init")
    _run(src, a)


def cmd_train_lm(a):
    _run(a.model, a)


def cmd_train_tokenizer(a):
    from s2d.train.tiny import train_tokenizer

    docs = [d if isinstance(d, str) else " ".join(m["content"] for m in d) for d in read_documents(a.data)]
    train_tokenizer(docs, a.vocab_size, a.out)
    print(f"tokenizer written to {a.out}")


def cmd_init_lm(a):
    from transformers import AutoTokenizer

    from s2d.train.tiny import llama_config, save_random_model

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    save_random_model(llama_config(len(tok), a.layers, a.hidden, a.heads, max_pos=a.max_pos), a.out, a.seed,
                      a.tokenizer)
    print(f"random model written to {a.out}")


def add_cli(sub):
    p = sub.add_parser("train-draft", help="SoFT-train a sorted draft (CE averaged over its exits)")
    p.add_argument("--draft", help="a draft from `s2d make-draft`")
    p.add_argument("--from", dest="from_", help="or: a source checkpoint to cut the draft from")
    p.add_argument("--layers", type=int)
    p.add_argument("--exits")
    p.add_argument("--kd-target", default=None, help="also distil from this target's logits")
    p.add_argument("--kd-weight", type=float, default=0.0)
    _train_flags(p)
    p.set_defaults(fn=cmd_train_draft)

    p = sub.add_parser("train-lm", help="train a causal LM (plain CE on the last layer), e.g. from `s2d init-lm`")
    p.add_argument("--model", required=True)
    _train_flags(p)
    p.set_defaults(fn=cmd_train_lm)

    p = sub.add_parser("init-lm", help="a randomly initialised Llama-style model for a tokenizer")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-pos", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_init_lm)

    p = sub.add_parser("train-tokenizer", help="byte-level BPE over a corpus (HF tokenizers)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_train_tokenizer)
