"""The sorted draft: the first L layers of a source model with exits at chosen depths, every exit
through the source's final norm and LM head. Saved as an ordinary Llama-family checkpoint whose
config also records `s2d_exits` and `s2d_source`, so transformers loads it as its deepest exit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from s2d.worker.graphs import StaticForward
from s2d.worker.model import CausalLM, confidence, load_safetensors_dir, pad_tokens

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def make_draft(source: str | Path, layers: int, exits: list[int], out: str | Path) -> Path:
    """Cut a sorted draft from `source`: its embedding, first `layers` layers, final norm and head."""
    cfg = json.loads((Path(source) / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    exits = sorted(set(exits))
    if not 1 <= layers <= n:
        raise ValueError(f"layers: {layers} is outside 1..{n} (the source has {n} layers)")
    if not exits or exits[0] < 1 or exits[-1] != layers:
        raise ValueError(f"exits: {exits} must be depths in 1..{layers} whose last is the draft's depth {layers}")
    state = load_safetensors_dir(source)
    keep = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) >= layers:
                continue
        keep[k] = v.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.update(num_hidden_layers=layers, s2d_exits=exits, s2d_source=str(Path(source).resolve()))
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:layers]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if cfg.get("tie_word_embeddings"):
        keep.pop("lm_head.weight", None)
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(source, out)
    return out


def copy_tokenizer(src, dst):
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, Path(dst) / name)


def read_exits(path: str | Path) -> list[int]:
    cfg = json.loads((Path(path) / "config.json").read_text())
    return list(cfg.get("s2d_exits") or [cfg["num_hidden_layers"]])


class SortedDraft:
    """A CausalLM run segment by segment (segment s = layers exits[s-1]..exits[s]) with lazy KV fill.

    Per slot and segment, `fill` counts positions whose KV that segment's layers hold; `hidden`
    keeps, per position, the output of the deepest segment it has been through. A token that goes
    deeper than its predecessors first runs the pending predecessors through that segment (from
    their stored hidden state), so its logits equal a full forward of every layer."""

    def __init__(self, lm: CausalLM, exits: list[int]):
        self.lm, self.exits = lm, exits
        self.bounds = list(zip([0, *exits[:-1]], exits))
        # one scratch position past the end takes the padding's writes, as in KVCache: no mask to count
        self.hidden = torch.zeros(lm.n_slots, lm.max_len + 1, lm.cfg.hidden_size, dtype=lm.dtype, device=lm.device)
        # each segment's step, exit head included, at static shapes (compiled on CPU, captured on CUDA)
        self.static = [StaticForward(lm, lm.static_mode, bounds, self.hidden) for bounds in self.bounds] \
            if lm.static_mode else []
        self.fill = [[0] * len(exits) for _ in range(lm.n_slots)]

    @classmethod
    def from_pretrained(cls, path, **kw) -> "SortedDraft":
        return cls(CausalLM.from_pretrained(path, **kw), read_exits(path))

    def truncate(self, slot: int, n: int):
        self.fill[slot] = [min(f, n) for f in self.fill[slot]]

    def prefill(self, slots: list[int], tokens: list[list[int]], ends: list[int]):
        """Every segment up to ends[b]: a prompt goes through the whole draft at once, so no later
        token that exits deep has a long lazy fill to catch up inside a decode batch."""
        for s in range(len(self.exits)):
            self.run_segment(s, slots, tokens, ends, logits=False)

    def run_segment(self, s: int, slots: list[int], tokens: list[list[int]], ends: list[int],
                    logits: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Bring segment s up to position ends[b] (exclusive) for each slot; return the exit's
        logits [B, V] at each slot's last position, and its confidence (top probability) and argmax
        [B]. `tokens` feeds segment 0."""
        lm = self.lm
        dev = lm.device
        starts = [self.fill[sl][s] for sl in slots]
        counts = [e - st for e, st in zip(ends, starts)]
        x = pad_tokens([t[st:e] for t, st, e in zip(tokens, starts, ends)], dev) if s == 0 else None  # [B, T]
        static = self.static[s] if self.static else None
        if static is not None and static.eligible(slots, counts):
            out = static.run(slots, starts, counts, x)
        else:
            out = self._run_eager(s, slots, starts, counts, x, logits)
        for sl, e in zip(slots, ends):
            self.fill[sl][s] = e
        return out if logits else None

    def _run_eager(self, s, slots, starts, counts, x, logits: bool):
        """run_segment through the packed eager forward (prefills, and models without a static step)."""
        lm = self.lm
        T = max(counts)
        _, write_pos = lm.positions(starts, counts, T, lm.device)  # [B, T]
        slot_idx = torch.tensor(slots, device=lm.device)[:, None].expand(-1, T)
        h = lm.embed(x) if s == 0 else self.hidden[slot_idx, write_pos]  # [B, T, d]
        h = lm.run_layers(h, lm.batch(slots, starts, counts), *self.bounds[s])
        self.hidden[slot_idx, write_pos] = h.to(self.hidden.device)
        if not logits:
            return None
        out = lm.logits(h[torch.arange(len(slots)), torch.tensor(counts, device=h.device) - 1])  # [B, V]
        return out, *confidence(out)
