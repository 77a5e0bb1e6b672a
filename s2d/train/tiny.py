"""Small checkpoints built locally: a byte-level BPE tokenizer trained on given text, and
Llama-family models in transformers' own format. Used by the demo family and by the tests."""
from __future__ import annotations

from pathlib import Path

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts, vocab_size: int, out: str | Path):
    """Byte-level BPE over `texts` (an iterable of strings), saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out))
    return fast


def llama_config(vocab_size: int, layers: int, hidden: int, heads: int = 4, kv_heads: int | None = None,
                 family: str = "llama", max_pos: int = 512, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
               max_position_embeddings=max_pos, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               tie_word_embeddings=kw.pop("tie_word_embeddings", True), **kw)


def save_random_model(cfg, out: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None,
                      init_std: float | None = None):
    """A randomly initialised model in transformers' format (safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if init_std:
        cfg.initializer_range = init_std
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(out))
    if tokenizer_dir:
        from s2d.worker.draft import copy_tokenizer

        copy_tokenizer(tokenizer_dir, out)
    return model
