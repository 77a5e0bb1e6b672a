"""Model runtime for Llama-family causal LMs (Llama 1/2/3, Vicuna, Mistral, Qwen2, SmolLM2), in
the style of gpt-fast: our own forward over an explicit static KV cache.

Module names mirror transformers' LlamaForCausalLM so a checkpoint's safetensors load as they are.
One forward runs any number of sequences, each with its own slot, start position and count of new
tokens (right-padded to a common T): prefill, decode and verification are the same call."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from s2d.worker.cache import KVCache
from s2d.worker.parallel import TensorParallel, check_divides

SUPPORTED = {"llama", "mistral", "qwen2"}
KEY_BUCKET = 64  # key lengths round up to this, so shapes repeat (compile/CUDA-graph friendly)


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest floor * 2**j >= n: the buckets of batch sizes and key lengths (graphs, costs)."""
    b = floor
    while b < n:
        b *= 2
    return b


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 steps are faster
    than fp32 (docs/bench/compiled.md); torch has no query for it. Elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device != "cpu" or cpu_has_bf16() else torch.float32
    return getattr(torch, name)


def resolve_static(mode: str, device: str) -> str | None:
    """What a static forward does: "on" (compiled on CPU, CUDA graphs on CUDA), "eager" (the same
    buffers and shapes, uncompiled: tests) or None (the packed eager forward). auto is "on", or
    "eager" where S2D_COMPILE=0 (the test suite: compiling every test's models would take minutes)."""
    if mode == "off":
        return None
    if mode == "auto":
        return "eager" if os.environ.get("S2D_COMPILE") == "0" else "on"
    return mode


def load_hf_config(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"{path}: model_type {cfg.model_type!r} is not supported (supported: {sorted(SUPPORTED)})")
    return cfg


def context_length(cfg, max_seq_len: int | None) -> int:
    """Positions a model's KV cache holds: the configured length, at most the model's context."""
    return min(max_seq_len or 2048, cfg.max_position_embeddings)


def rope_inv_freq(cfg) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Group:
    """Rows of a forward that share a width (tokens per row, right-padded) and a key length: the
    unit of one attention call. A packed forward holds several, so that a prompt chunk is not
    padded into the decode rows and short contexts do not attend over a long one's keys."""

    start: int  # offset of the group's first token in the flat token sequence
    rows: int
    width: int
    slots: torch.Tensor  # [rows]
    mask: torch.Tensor  # [rows, 1, width, n_keys]
    n_keys: int
    contiguous_from: int | None  # slots are adjacent: the cache is read as a view


@dataclass
class Batch:
    """Where each row's new tokens go: row b holds counts[b] tokens at positions starts[b]... The
    tensors are [B, T], or [1, N] for a packed forward (every group's rows flattened in order)."""

    tok_slots: torch.Tensor  # [B, T] the slot of each token
    pos: torch.Tensor  # [B, T] positions (padding continues counting)
    write_pos: torch.Tensor  # [B, T] cache rows to write (padding -> scratch row)
    groups: list[Group]
    counts: list[int]

    @property
    def last(self) -> torch.Tensor:  # index of each row's last real token (one-group batches)
        return torch.tensor([c - 1 for c in self.counts], device=self.pos.device)


class Attention(nn.Module):
    """Self-attention; under tensor parallelism this rank's heads only (s2d/worker/parallel.py)."""

    def __init__(self, cfg, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.n_heads, self.n_kv = tp.part(cfg.num_attention_heads), tp.part(cfg.num_key_value_heads)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        bias = getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2"
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=getattr(cfg, "attention_bias", False))

    def fuse(self):
        """One [d, (H + 2 Hkv) D] matrix for q, k and v (one matmul instead of three: on the small
        batches of decode and verify, the calls cost more than the arithmetic), stored input-major
        for x @ W. The Linear modules keep views of it, so the checkpoint's names and state_dict
        stay as they were."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        self.w_qkv = torch.cat([p.weight for p in parts]).t().contiguous()
        self.b_qkv = torch.cat([p.bias for p in parts]) if self.q_proj.bias is not None else None
        self.w_o = self.o_proj.weight.t().contiguous()
        self.b_o = self.o_proj.bias
        at = 0
        for p in parts:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(self.w_qkv[:, at:at + n].t(), requires_grad=False)
            at += n
        self.o_proj.weight = nn.Parameter(self.w_o.t(), requires_grad=False)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, b: Batch):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        qkv = x @ self.w_qkv  # [B, T, (H + 2 Hkv) D]
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        qk = qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D).transpose(1, 2)  # rope on q and k at once
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D).transpose(1, 2)
        cache.write(layer, b.tok_slots, b.write_pos, k, v)
        if len(b.groups) == 1 and b.groups[0].rows == B:  # [B, T]: one attention call
            g = b.groups[0]
            keys, values = cache.read(layer, g.slots, g.n_keys, g.contiguous_from)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=g.mask, enable_gqa=Hkv != H)
            return self._out(y.transpose(1, 2).reshape(B, T, -1))
        ys, q = [], q[0]  # packed: [H, N, D], one attention call per group
        for g in b.groups:
            qg = q[:, g.start:g.start + g.rows * g.width].view(H, g.rows, g.width, -1).transpose(0, 1)
            keys, values = cache.read(layer, g.slots, g.n_keys, g.contiguous_from)
            y = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask, enable_gqa=Hkv != H)
            ys.append(y.transpose(0, 1).reshape(H, g.rows * g.width, -1))
        return self._out(torch.cat(ys, 1).transpose(0, 1).reshape(1, T, -1))

    def _out(self, y):
        y = self.tp.reduce(y @ self.w_o)  # row-parallel: the ranks' partial sums
        return y if self.b_o is None else y + self.b_o


class MLP(nn.Module):
    def __init__(self, cfg, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        bias, inter = getattr(cfg, "mlp_bias", False), tp.part(cfg.intermediate_size)
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=bias)

    def fuse(self):
        """gate and up as one input-major [d, 2 I] matrix (see Attention.fuse)."""
        n = self.gate_proj.weight.shape[0]
        self.w_gu = torch.cat([self.gate_proj.weight, self.up_proj.weight]).t().contiguous()
        self.b_gu = torch.cat([self.gate_proj.bias, self.up_proj.bias]) if self.gate_proj.bias is not None else None
        self.w_d = self.down_proj.weight.t().contiguous()
        self.gate_proj.weight = nn.Parameter(self.w_gu[:, :n].t(), requires_grad=False)
        self.up_proj.weight = nn.Parameter(self.w_gu[:, n:].t(), requires_grad=False)
        self.down_proj.weight = nn.Parameter(self.w_d.t(), requires_grad=False)

    def forward(self, x):
        gu = x @ self.w_gu
        if self.b_gu is not None:
            gu = gu + self.b_gu
        gate, up = gu.chunk(2, dim=-1)
        y = self.tp.reduce((F.silu(gate) * up) @ self.w_d)  # row-parallel: the ranks' partial sums
        return y if self.down_proj.bias is None else y + self.down_proj.bias


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # same math as transformers: normalise in fp32, scale in the model dtype
        if x.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg, tp: TensorParallel):
        super().__init__()
        self.self_attn = Attention(cfg, tp)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, b):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, b)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A Llama-family LM over a static KV cache with `n_slots` sequences of `max_len` tokens; with
    `tp`, one rank's part of it (s2d/worker/parallel.py)."""

    def __init__(self, cfg, n_slots=8, max_len=None, dtype=torch.float32, device="cpu", static_forward="off",
                 tp: TensorParallel | None = None):
        super().__init__()
        tp = tp or TensorParallel()
        check_divides(tp.size, cfg, "tensor_parallel")
        self.cfg, self.tp = cfg, tp
        self.model = Backbone(cfg, tp)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.n_layers = cfg.num_hidden_layers
        self.max_len = context_length(cfg, max_len)
        self.window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        with torch.device("cpu"):  # real values even when the module is built on the meta device
            inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.n_slots, self.dtype, self.device = n_slots, dtype, device
        self.cache: KVCache | None = None
        self.forward_s = 0.0  # seconds spent in layers and head (on CPU; on a GPU, launching them)
        # s2d/worker/graphs.py: decode and verify at static shapes, compiled or captured (resolve_static),
        # given to a target by graphs.attach; a sorted draft builds one per segment instead
        self.static_forward = static_forward
        self.static = self.static_fill = None  # decode and verify; prompt chunks

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, n_slots=8, max_len=None, dtype="float32", device="cpu", trust_remote_code=False,
                        static_forward="off", tp: TensorParallel | None = None):
        """A checkpoint as a model (with `tp`, this rank's part, read as such): fp32 unless asked
        (configs pass their dtype, "auto" included)."""
        cfg = load_hf_config(path, trust_remote_code)
        torch_dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
        with torch.device("meta"):
            model = cls(cfg, n_slots, max_len, torch_dtype, device, static_forward, tp)
        model.load_weights(load_safetensors_dir(path, model.tp.shard))
        return model

    def load_weights(self, state: dict[str, torch.Tensor]):
        if self.tied:
            state.pop("lm_head.weight", None)
        missing = set(self.state_dict().keys()) - set(state) - ({"lm_head.weight"} if self.tied else set())
        unexpected = set(state) - set(self.state_dict().keys())
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        self.load_state_dict(state, strict=False, assign=True)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.cfg)[0]
        self.place()

    def place(self):
        """Move weights to the device and dtype, and allocate the cache."""
        inv_freq = self.inv_freq  # fp32: rope is computed in fp32 whatever the dtype
        self.to(self.device, self.dtype)
        self.inv_freq = inv_freq.to(self.device)
        self.eval().requires_grad_(False)
        with torch.no_grad():
            for layer in self.model.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()
            self.w_head = self.lm_head.weight.t().contiguous()  # [d, V] (a copy when tied to the embedding)
            if not self.tied:
                self.lm_head.weight = nn.Parameter(self.w_head.t(), requires_grad=False)
        self.static_mode = resolve_static(self.static_forward, self.device)
        attn = self.model.layers[0].self_attn
        self.cache = KVCache(self.n_slots, self.max_len, self.n_layers, attn.n_kv, attn.head_dim, self.dtype,
                             self.device)
        return self

    # -- forward -------------------------------------------------------------------------------
    def batch(self, slots: list[int], starts: list[int], counts: list[int]) -> Batch:
        """Describe a forward of counts[b] new tokens for slot slots[b] starting at starts[b]."""
        g, pos, write_pos = self._group(0, slots, starts, counts)
        return Batch(g.slots[:, None].expand_as(pos), pos.clamp(max=self.max_len - 1), write_pos, [g], counts)

    def packed(self, groups: list[tuple[list[int], list[int], list[int]]]) -> Batch:
        """One forward over several groups of (slots, starts, counts), their tokens flattened in
        order (see `pack_tokens`): each group is padded to its own width only."""
        start, parts, out, counts = 0, [], [], []
        for slots, starts, cnt in groups:
            g, pos, write_pos = self._group(start, slots, starts, cnt)
            parts.append((g.slots[:, None].expand_as(pos), pos, write_pos))
            out.append(g)
            counts += cnt
            start += g.rows * g.width
        tok_slots, pos, write_pos = (torch.cat([p[i].reshape(-1) for p in parts])[None] for i in range(3))
        return Batch(tok_slots, pos.clamp(max=self.max_len - 1), write_pos, out, counts)

    def causal_mask(self, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[B, T, K]: which cached keys (positions `keys`, [K]) each position attends to (causal,
        sliding window). Pure tensor code: the static steps build it inside their graph."""
        mask = keys <= pos[:, :, None]
        if self.window:
            mask &= keys > pos[:, :, None] - self.window
        return mask

    def check_fits(self, end: int):
        if end > self.max_len:
            raise ValueError(f"sequence needs {end} positions, past the KV cache's {self.max_len}")

    def row_positions(self, starts: torch.Tensor, counts: torch.Tensor, cols: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] each row's positions from its start (starts, counts [B], cols = 0..T-1), and the
        cache rows its tokens write: past a row's counts[b] tokens (padding), the scratch row at
        max_len. Pure tensor code, as causal_mask."""
        pos = starts[:, None] + cols
        return pos, torch.where(cols < counts[:, None], pos, self.max_len)

    def positions(self, starts: list[int], counts: list[int], T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """row_positions from lists, after checking that the rows fit the cache."""
        self.check_fits(max(s + c for s, c in zip(starts, counts)))
        return self.row_positions(torch.tensor(starts, device=device), torch.tensor(counts, device=device),
                                  torch.arange(T, device=device))

    def _group(self, start: int, slots: list[int], starts: list[int], counts: list[int]):
        dev = self.device
        pos, write_pos = self.positions(starts, counts, max(counts), dev)
        end = max(s + c for s, c in zip(starts, counts))
        n_keys = min(-(-end // KEY_BUCKET) * KEY_BUCKET, self.max_len + 1)
        mask = self.causal_mask(pos, torch.arange(n_keys, device=dev))
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        g = Group(start, len(slots), pos.shape[1], torch.tensor(slots, device=dev), mask[:, None], n_keys,
                  slots[0] if contiguous else None)
        return g, pos, write_pos

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens.to(self.device))

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, T, D] of positions [B, T], in the model's dtype."""
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.rope_scale).to(self.dtype)[:, None],
                (emb.sin() * self.rope_scale).to(self.dtype)[:, None])

    def run_layers(self, h: torch.Tensor, b: Batch, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        cos, sin = self.rope(b.pos)
        for i in range(start, self.n_layers if stop is None else stop):
            h = self.model.layers[i](h, cos, sin, self.cache, i, b)
        self.forward_s += time.perf_counter() - t0
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] fp32 logits: the final norm and the LM head, pure tensor code (the
        static steps run it inside their graph)."""
        return (self.model.norm(h) @ self.w_head).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """`head`, timed into forward_s."""
        t0 = time.perf_counter()
        out = self.head(h)
        self.forward_s += time.perf_counter() - t0
        return out

    def forward(self, tokens: torch.Tensor, b: Batch) -> torch.Tensor:
        """All logits [B, T, V] of a batch (tests and training-free uses)."""
        return self.logits(self.run_layers(self.embed(tokens), b))


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sorted draft's exit decision on logits [B, V]: each row's top probability and argmax [B]."""
    return torch.softmax(logits, -1).max(-1)


def load_safetensors_dir(path, part=None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded); safetensors only. With `part`
    (name, lazy slice) -> tensor, only what it slices is read (a tensor-parallel rank's share)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (only safetensors checkpoints are loaded)")
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    if part is None:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                state[k] = part(k, st.get_slice(k))
    return state


def pad_tokens(rows: list[list[int]], device) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)


def pack_tokens(groups: list[list[list[int]]], device) -> torch.Tensor:
    """[1, N]: each group's rows right-padded to the group's width, all flattened in order."""
    flat = []
    for rows in groups:
        T = max(len(r) for r in rows)
        for r in rows:
            flat += r + [0] * (T - len(r))
    return torch.tensor([flat], device=device)
