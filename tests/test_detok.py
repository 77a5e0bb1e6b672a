"""Incremental detokenization gives exactly a full decode, and never takes back text it streamed:
random token lists (multi-byte characters split over tokens, special tokens among them) pushed in
random chunks, on the demo family's byte-level BPE and on SmolLM2's tokenizer."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from s2d.core.config import load_config
from s2d.core.detok import Detokenizer

DEMO = load_config("demo")


@pytest.fixture(scope="module", params=["demo", "smollm2"])
def tokenizer(request):
    if request.param == "demo":
        return AutoTokenizer.from_pretrained(DEMO.resolve(DEMO.targets[0].path))
    return AutoTokenizer.from_pretrained(str(request.getfixturevalue("smollm2")))


def test_incremental_text_is_a_full_decode(tokenizer):
    vocab = len(tokenizer)
    text = "Zürich: 東京 🙂 déjà vu\n\tdef f(x):\n        return x"
    base = tokenizer(text)["input_ids"]

    @settings(max_examples=150, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.one_of(st.integers(0, vocab - 1), st.sampled_from(base)), max_size=48),
           st.lists(st.integers(1, 6), min_size=1, max_size=48))
    def check(ids, cuts):
        d, at, streamed = Detokenizer(tokenizer), 0, ""
        for c in cuts * len(ids):
            if at >= len(ids):
                break
            now = d.push(ids[at:at + c])
            assert now.startswith(streamed)  # text once sent is never taken back
            streamed, at = now, at + c
        assert d.full() == tokenizer.decode(ids, skip_special_tokens=True)

    check()
