"""The runtime against transformers: logits parity, rollback, lazy KV fill, exits."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from s2d.core.config import SamplingParams
from s2d.train.tiny import llama_config, save_random_model
from s2d.worker.draft import SortedDraft
from s2d.worker.model import CausalLM, pad_tokens
from s2d.worker.workers import ProposeItem, Proposer

FAMILIES = {
    "llama": dict(family="llama", kv_heads=4, tie_word_embeddings=False),
    "llama3-gqa-rope-scaling": dict(family="llama", kv_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "mistral-sliding-window": dict(family="mistral", kv_heads=2, sliding_window=16, tie_word_embeddings=False),
    "qwen2-qkv-bias": dict(family="qwen2", kv_heads=2),
}


def hf_logits(ref, tokens):
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(tmp_path, name):
    ref = save_random_model(llama_config(97, 2, 64, max_pos=256, **FAMILIES[name]), tmp_path, seed=3).eval()
    m = CausalLM.from_pretrained(tmp_path, n_slots=4, max_len=128)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (40, 7, 19)]
    with torch.no_grad():
        out = m(pad_tokens(seqs, "cpu"), m.batch([2, 0, 1], [0, 0, 0], [len(s) for s in seqs]))
        for i, s in enumerate(seqs):  # batched prefill of different lengths, padded
            assert (out[i, : len(s)] - hf_logits(ref, s)).abs().max() <= 1e-4
        more = torch.randint(0, 97, (3,), generator=g).tolist()  # continue slot 2 from its cache
        got = m(torch.tensor([more]), m.batch([2], [40], [3]))[0]
        assert (got - hf_logits(ref, seqs[0] + more)[40:]).abs().max() <= 1e-4


def test_smollm2_logits_match_transformers(smollm2):
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    m = CausalLM.from_pretrained(smollm2, n_slots=1, max_len=64)
    tokens = [1, 504, 3458, 282, 4649, 314, 9809, 30, 378, 3458, 282]
    with torch.no_grad():
        got = m(torch.tensor([tokens]), m.batch([0], [0], [len(tokens)]))[0]
    assert (got - hf_logits(ref, tokens)).abs().max() <= 1e-4


def test_rollback_equals_fresh_prefill(family):
    m = CausalLM.from_pretrained(family["large"], n_slots=2, max_len=128)
    ref = AutoModelForCausalLM.from_pretrained(str(family["large"])).eval()
    a, rejected, c = list(range(10, 30)), [5, 6, 7, 8], [40, 41, 42]
    with torch.no_grad():
        m(torch.tensor([a + rejected]), m.batch([1], [0], [24]))
        got = m(torch.tensor([c]), m.batch([1], [20], [3]))[0]  # rollback = start writing at 20 again
    assert (got - hf_logits(ref, a + c)[20:]).abs().max() <= 1e-4


def exit_logits_reference(path, tokens, depth):
    """transformers' hidden state after `depth` layers, through the shared norm and head."""
    ref = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        out = ref(torch.tensor([tokens]), output_hidden_states=True)
        if depth == ref.config.num_hidden_layers:
            return out.logits[0]
        return ref.lm_head(ref.model.norm(out.hidden_states[depth]))[0]


@pytest.mark.parametrize("static_forward", ["off", "eager"])
def test_lazy_kv_fill_equals_full_forward(family, static_forward):
    """Drive tokens to random exits one at a time; every exit's logits equal running all its layers,
    through the packed forward and through the static step (whose exit head runs inside it)."""
    draft = SortedDraft.from_pretrained(family["draft"], n_slots=2, max_len=128, static_forward=static_forward)
    tokens = list(range(50, 90))
    refs = {e: exit_logits_reference(family["draft"], tokens, e) for e in draft.exits}
    g = torch.Generator().manual_seed(1)
    draft.run_segment(0, [1], [tokens], [10])  # a prefill that stops at the first exit
    with torch.no_grad():
        for p in range(11, len(tokens) + 1):
            depth = int(torch.randint(1, len(draft.exits) + 1, (1,), generator=g))
            for s in range(depth):
                logits, conf, top = draft.run_segment(s, [1], [tokens], [p])
                assert (logits[0] - refs[draft.exits[s]][p - 1]).abs().max() <= 1e-4, (p, s)
                assert int(top[0]) == int(logits[0].argmax()) and 0 < float(conf[0]) <= 1


def test_lazy_fill_after_rollback_equals_full_forward(family):
    """Rejected drafts roll the draft back; what follows must still equal a full forward."""
    draft = SortedDraft.from_pretrained(family["draft"], n_slots=1, max_len=128)
    first, second = list(range(50, 80)), list(range(50, 65)) + list(range(200, 215))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in range(1, len(first) + 1):  # random depths along the first sequence
            for s in range(int(torch.randint(1, 4, (1,), generator=g))):
                draft.run_segment(s, [0], [first], [p])
        draft.truncate(0, 15)  # keep the common prefix of 15 tokens
        refs = {e: exit_logits_reference(family["draft"], second, e) for e in draft.exits}
        for p in range(16, len(second) + 1):
            depth = int(torch.randint(1, 4, (1,), generator=g))
            for s in range(depth):
                got = draft.run_segment(s, [0], [second], [p])[0][0]
                assert (got - refs[draft.exits[s]][p - 1]).abs().max() <= 1e-4, (p, s)


def _exits_used(family, thresholds):
    prop = Proposer(SortedDraft.from_pretrained(family["draft"], n_slots=2, max_len=128))
    item = ProposeItem("a", list(range(100, 120)), 6, thresholds, 0.0, SamplingParams(), 0)
    return prop.propose([item])[0].exits


def test_threshold_zero_exits_first_above_one_exits_last(family):
    assert _exits_used(family, [0.0, 0.0, 0.0]) == [1] * 6
    assert _exits_used(family, [1.01, 1.01, 1.01]) == [3] * 6


def test_draft_checkpoint_records_exits_and_loads_in_transformers(family):
    cfg = json.loads((family["draft"] / "config.json").read_text())
    assert cfg["s2d_exits"] == [1, 2, 3] and cfg["num_hidden_layers"] == 3
    ref = exit_logits_reference(family["small"], list(range(5, 25)), 3)
    assert (exit_logits_reference(family["draft"], list(range(5, 25)), 3) - ref).abs().max() <= 1e-5
