"""Training: SoFT end to end through the CLI, exact resume, chat loss masks, the demo build and the
bench (shortened: the real runs are benchmarks, not tests)."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import STDLIB, stdlib_texts
from safetensors.torch import load_file
from transformers import AutoTokenizer

from s2d.tools.bench import find_spec_bench, spec_bench_prompts
from s2d.train.demo import corpus_files
from s2d.train.soft import TrainArgs, encode_document, pack, train
from s2d.worker.draft import SortedDraft, read_exits


def small_data(family, seq_len=32):
    tok = AutoTokenizer.from_pretrained(str(family["tok"]))
    return pack(tok, stdlib_texts()[:2], seq_len)


def test_resume_after_interruption_gives_the_same_weights(family, tmp_path):
    data = small_data(family)
    kw = dict(max_steps=4, batch_size=2, seq_len=32, lr=1e-3, progress=False, save_every=100)
    train(family["draft"], data, TrainArgs(out=str(tmp_path / "a"), **kw))
    train(family["draft"], data, TrainArgs(out=str(tmp_path / "b"), stop_after=2, **kw))
    train(family["draft"], data, TrainArgs(out=str(tmp_path / "b"), resume=True, **kw))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    init = load_file(str(family["draft"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a if k in init)  # it did train


def test_train_draft_cli_soft_trains_every_exit(family, tmp_path):
    out = tmp_path / "draft"
    subprocess.run([sys.executable, "-m", "s2d.tools.cli", "train-draft", "--from", str(family["small"]),
                    "--layers", "3", "--exits", "1,2,3", "--data", str(STDLIB / "json"),
                    "--eval-data", str(STDLIB / "json" / "tool.py"),
                    "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--out", str(out)],
                   check=True, capture_output=True)
    assert read_exits(out) == [1, 2, 3]
    log = json.loads((out / "train_log.json").read_text())
    assert set(log["summary"]["final_loss"]) == {"1", "2", "3"} and set(log["summary"]["eval_loss"]) == {"1", "2", "3"}
    SortedDraft.from_pretrained(out, n_slots=1, max_len=64)


def test_chat_loss_mask_covers_only_assistant_tokens(smollm2):
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ids, mask = encode_document(tok, chat)
    assert ids == tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Blue." in learned and "Green." in learned and "colour" not in learned and "Another" not in learned


def test_corpus_skips_third_party_and_tests(tmp_path):
    for rel in ("a.py", "pkg/b.py", "site-packages/x/c.py", "test/d.py", "pkg/tiny.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n" * (10 if rel.endswith("tiny.py") else 500))
    assert [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)] == ["a.py", "pkg/b.py"]


@pytest.mark.skipif(find_spec_bench() is None, reason="Spec-Bench's questions are not in ../shared/data/spec_bench "
                    "(this workspace only; Spec-Bench's repository has them as data/spec_bench/question.jsonl)")
def test_spec_bench_calibration_split_is_disjoint():
    sb = find_spec_bench()
    bench = {q for qs in spec_bench_prompts(sb, 1000).values() for q in qs}
    calib = {q for qs in spec_bench_prompts(sb, 1000, calibration=True).values() for q in qs}
    assert bench and calib and not bench & calib and len(bench) > 2 * len(calib)


def test_build_demo_quick_then_bench_quick(tmp_path):
    demo, docs = tmp_path / "demo", tmp_path / "docs"
    docs.mkdir()
    prose = (Path(__file__).parents[1] / "README.md").read_text()
    for i in range(3):
        (docs / f"page{i}.rst.txt").write_text(prose)
    # the GPU recipe's code path (bf16 autocast, held-out loss at intervals) runs on CPU too
    subprocess.run([sys.executable, "-m", "s2d.tools.cli", "build-demo", "--quick", "--recipe", "gpu",
                    "--out", str(demo), "--docs", str(docs)], check=True, capture_output=True)
    assert {p.name for p in demo.iterdir()} >= {"demo-s", "demo-m", "demo-l", "demo-draft", "demo.yaml"}
    card = (demo / "demo-draft" / "README.md").read_text()
    assert "build-demo --quick --recipe gpu" in card and "Python docs" in card and "bf16 autocast" in card
    assert set(json.loads((demo / "build.json").read_text())["models"]["demo-draft"]["heldout_loss"]) == {"1", "2", "3"}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert all((stdlib / name).exists() for name in (demo / "heldout_files.txt").read_text().split())
    out = tmp_path / "bench"
    subprocess.run([sys.executable, "-m", "s2d.tools.cli", "bench", "--config", str(demo / "demo.yaml"), "--quick",
                    "--target", "demo-l", "--out", str(out)], check=True, capture_output=True)
    result = json.loads((out / "bench.json").read_text())
    modes = {r["mode"] for r in result["overall"]}
    assert modes == {"ar", "fixed:1", "fixed:2", "fixed:3", "s2d"}
    assert all(r["speedup"] > 0 and r["mat"] >= 1.0 for r in result["overall"])
    assert ((out / "speedup.png").exists() and (out / "exits.png").exists()
            and "| demo-l |" in (out / "bench.md").read_text())
