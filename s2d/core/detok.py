"""Incremental detokenization: the text of a growing token list, decoding only a short window of
the newest tokens per round (vLLM's prefix and read offsets), so a long output does not cost a
full decode every round. A tail that does not decode to whole characters yet (a multi-byte
character split over tokens) is held back until it does."""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, ids=(), skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # the stable text: whole characters only
        self.prefix = self.read = 0  # ids[prefix:read] is the window already in `text`
        self.push(list(ids))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the stable text so far."""
        self.ids += ids
        if not ids:
            return self.text
        # decoding the window with a few tokens of context keeps the spaces a tokenizer adds or
        # drops at a word boundary (SentencePiece's leading space) exactly as a full decode does
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def full(self) -> str:
        """The stable text and the held-back tail as it decodes now (the end of an output)."""
        before = self._decode(self.ids[self.prefix:self.read])
        return self.text + self._decode(self.ids[self.prefix:])[len(before):]
