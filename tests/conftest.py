"""Real checkpoints the tests build: a BPE tokenizer trained on stdlib source, two random targets of
different families sharing it, sorted drafts cut from the smaller one, and SmolLM2-135M-Instruct."""
from __future__ import annotations

import os
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch

from deployments.local import set_local_env
from s2d.core.config import EngineConfig
from s2d.train.tiny import llama_config, save_random_model, train_tokenizer
from s2d.worker.draft import make_draft

set_local_env()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the static forwards run uncompiled (the same shapes and buffers): compiling every test's models
# would take minutes; tests/test_compiled.py compiles on purpose
os.environ.setdefault("S2D_COMPILE", "0")
os.environ.setdefault("S2D_AUTOTUNE", "0")  # test_compiled: autotuning its GEMMs takes minutes (S2D_AUTOTUNE=1 runs it)
torch.set_num_threads(min(2, os.cpu_count() or 1))

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(pattern: str = "json/*.py") -> list[str]:
    return [p.read_text(errors="ignore") for p in sorted(STDLIB.glob(pattern))]


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("family")
    train_tokenizer(stdlib_texts(), 512, d / "tok")
    # init_std 0.1: peaked distributions, so argmax ties are rare and drafts get rejected for real
    save_random_model(llama_config(512, 4, 64), d / "small", 0, d / "tok", init_std=0.1)
    save_random_model(llama_config(512, 6, 96, kv_heads=2), d / "large", 1, d / "tok", init_std=0.1)
    save_random_model(llama_config(512, 3, 64), d / "other", 2, d / "tok", init_std=0.1)
    make_draft(d / "small", 3, [1, 2, 3], d / "draft")
    make_draft(d / "small", 4, [2, 4], d / "full-draft")  # as deep as its target: full acceptance
    make_draft(d / "other", 3, [1, 3], d / "untrained-draft")  # unrelated weights: low acceptance
    return {p.name: p for p in d.iterdir()}


V = 8  # tiny_vocab's vocabulary


@pytest.fixture(scope="session")
def tiny_vocab(tmp_path_factory):
    """A target and a sorted draft over a vocabulary of V tokens: small enough to test distributions."""
    d = tmp_path_factory.mktemp("v8")
    save_random_model(llama_config(V, 2, 32, max_pos=64), d / "target", 5, init_std=0.5)
    save_random_model(llama_config(V, 2, 32, max_pos=64), d / "draft-src", 6, init_std=0.5)
    make_draft(d / "draft-src", 2, [1, 2], d / "draft")
    return d


def make_config(family, draft="draft", targets=("small", "large"), **target_kw) -> EngineConfig:
    """fp32 unless asked (token-for-token checks need it; auto is bf16 on a CPU with AVX512-BF16)."""
    kw = {"dtype": "float32", **target_kw}
    return EngineConfig.model_validate({
        "draft": {"path": str(family[draft]), "max_seqs": 8, "max_seq_len": 256, **{k: v for k, v in kw.items()
                                                                                  if k in ("dtype", "static_forward")}},
        "targets": [{"name": t, "path": str(family[t]), "max_seqs": 8, "max_seq_len": 256, **kw} for t in targets],
    })


def wait_for(predicate, timeout: float, what: str):
    """Poll until predicate() holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def serve_logs(since: list | None = None) -> list[tuple[str, str]]:
    """(file name, line) of this cluster's Serve logs (proxy, replicas); with `since` (an earlier
    call's result), only the lines added after it."""
    import ray

    d = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    lines = [(p.name, line) for p in sorted(d.glob("*.log")) for line in p.read_text(errors="replace").splitlines()]
    seen = set(since or ())
    return [x for x in lines if x not in seen]


def loud_lines(lines: list[tuple[str, str]]) -> list[str]:
    """Lines at WARNING or above, and tracebacks."""
    return [line for _, line in lines if line.startswith(("ERROR", "WARNING", "CRITICAL")) or "Traceback" in line]


class StreamingClients:
    """`n` threads, each streaming greedy requests of `target` over `prompts` in turn until it is
    stopped: every finished stream's (prompt, token ids) lands in `got`, a failure in `errors`
    (its thread then ends). `exact()`: every stream equals the in-process engine's greedy output."""

    def __init__(self, client, target: str, prompts: list[str], n: int, max_tokens: int):
        self.client, self.target, self.prompts, self.max_tokens = client, target, prompts, max_tokens
        self.got: list[tuple[str, list[int]]] = []
        self.errors: list[str] = []
        self.stops = [threading.Event() for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int):
        n = 0
        while not self.stops[i].is_set():
            p = self.prompts[(i + n) % len(self.prompts)]
            n += 1
            try:
                chunks = self.client.stream(self.target, p, max_tokens=self.max_tokens, temperature=0.0)
                tokens = [t for c in chunks for t in c.token_ids]
            except Exception as e:  # noqa: BLE001 - the test fails on it
                self.errors.append(repr(e))
                return
            self.got.append((p, tokens))

    def stop(self, *which: int):
        """Stop the given clients (default: all) and wait for their streams to end."""
        for i in which or range(len(self.threads)):
            self.stops[i].set()
            self.threads[i].join(timeout=120)

    def exact(self, engine) -> bool:
        from s2d.core.engine import Request, greedy

        want = {p: engine.generate([Request(target=self.target, prompt=p, params=greedy(self.max_tokens))])[0]
                ["token_ids"] for p in self.prompts}
        return all(tokens == want[p] for p, tokens in self.got)


def served(config_path, timeout: float = 120):
    """Serve a config on a local Ray cluster; yields a gRPC client of it, then shuts Ray down."""
    from deployments.local import serve_locally, shutdown
    from s2d.api.client import S2DClient

    client = S2DClient(serve_locally(str(config_path), num_cpus=2), timeout=timeout)
    yield client
    client.close()
    shutdown()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    from s2d.train.convert import convert_gguf

    return convert_gguf(None, tmp_path_factory.mktemp("smollm2") / "smollm2")


PROMPTS = [
    "def ", "import json", "class JSONDecoder(object):", "    return", "x = [1, 2, 3]\n", "if __name__ == '__main__':",
    '"""Docstring."""', "for i in range(10):", "try:\n    pass\nexcept", "raise ValueError(", "self.", "# comment",
    "print('hello')", "while True:", "with open(f) as fh:", "lambda x: x", "from . import", "yield from",
    "assert x == y", "del d[k]", "global _default", "async def main():", "await", "@property", "elif s[0] == 'n':",
    "else:", "return obj", "import re", "s = ''", "n += 1", "def encode(o):", "def decode(s):", "JSON", "{}", "[]",
    "None", "True and False", "'\\n'.join(lines)", "sorted(d.items())", "isinstance(o, dict)", "float('nan')",
    "chunks = []", "_one_shot=True", "end = s.find", "c = s[end]", "u = uni", "kw['cls']", "object_hook",
    "parse_float", "indent=4",
]
assert len(PROMPTS) >= 50
