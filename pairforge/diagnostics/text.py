"""Per-pair text metrics, vectorised: word-level Levenshtein, lengths, identical / near-duplicate.

The word-level Levenshtein distance between chosen and rejected is the measure VaPR uses to
compare preference sets (minimal edits differ by a word or two, sampled pairs by dozens;
DESIGN.md, "Bias diagnostics"): insertions, deletions and substitutions of whole words, each
costing 1, normalised by the longer answer's word count.

Words (the unit of the Levenshtein distance): whitespace tokens (``str.split``), lower-cased,
with punctuation (any character that is neither a letter nor a digit, ``[\\W_]``) stripped at
both edges; a token left empty (a lone ``—`` or ``*``) is dropped. So ``"The cat."`` and
``"the CAT"`` are the same two words, ``"don't"`` stays one word.

Scripts written without spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Burmese)
have no whitespace words: ``"这是一只小猫咪。"`` is one token, so a one-character edit would count
as "every word changed". Such sets are measured in **characters** instead (``edit_unit``):
the text lower-cased with everything but letters, digits and combining marks removed, and the
Levenshtein distance taken over those characters. A set has one edit unit for all its pairs
(:func:`choose_edit_unit`), never a mix.

The fast path never runs a per-pair dynamic programme in Python: a batch of texts is split on
whitespace by pyarrow, each distinct token is normalised once, each distinct word becomes one
code point, so every answer is a short string, and rapidfuzz computes the element-wise
Levenshtein distances in C++ (``cpdist``). :func:`reference_pair_metrics` is the plain
pure-Python definition the fast path is tested against (and the benchmark's baseline).
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cpdist

from pairforge.diagnostics.thresholds import THRESHOLDS
from pairforge.errors import PairforgeError

if TYPE_CHECKING:
    from pairforge.diagnostics.lengths import LengthUnit

#: Pairs per internal batch of :func:`pair_metrics`; keeps memory flat on any input size.
BATCH_PAIRS = 8192
#: Default threads of :func:`pair_metrics`: measured 1.7x faster with 2 than with 1 on an idle
#: 2-core machine, but up to 25% slower when other jobs hold the cores.
THREADS = min(2, os.cpu_count() or 1)

_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
#: Units of the edit distance; ``characters`` for sets in scripts written without spaces.
EDIT_UNITS = ("words", "characters")
#: Scripts written without spaces between words (RE2 classes, as pyarrow's regex takes them).
UNSPACED_SCRIPTS = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]"
#: A text is "unspaced" when at least this share of its non-whitespace characters are in an
#: unspaced script.
UNSPACED_TEXT_SHARE = 0.3
#: A set is measured in characters when at least this share of its pairs (of the first chunk
#: the audit reads) has an unspaced chosen or rejected text.
UNSPACED_PAIR_RATE = 0.1
#: What :func:`characters` removes (RE2): anything but letters, digits, combining marks.
_NOT_CHARACTER = r"[^\p{L}\p{N}\p{M}]+"
_SURROGATES = 0xD800, 0xE000
_MAX_CODES = 0x110000 - (_SURROGATES[1] - _SURROGATES[0])  # code points a string can hold


# ----------------------------------------------------------------------------- the word rule


def normalize_word(token: str) -> str:
    """One whitespace token → its word: lower-cased, punctuation stripped at both edges."""
    return _EDGE_PUNCT.sub("", token.lower())


def words(text: str) -> list[str]:
    """The words of a text (module docstring), in order."""
    return [w for w in map(normalize_word, text.split()) if w]


def characters(text: str) -> str:
    """The characters the ``characters`` edit unit compares: lower-cased letters, digits and
    combining marks (Unicode categories L, N, M), all else (spaces, punctuation) removed."""
    return "".join(c for c in text.lower() if unicodedata.category(c)[0] in "LNM")


def as_arrow(texts: Sequence[str] | pa.Array) -> pa.Array:
    """Texts as an Arrow string array (an Arrow array, as the audit's reader gives, as is)."""
    return texts if isinstance(texts, pa.Array) else pa.array(list(texts), type=pa.string())


def text_at(texts: Sequence[str] | pa.Array, i: int) -> str:
    """``texts[i]`` as a Python string, for a list or an Arrow array."""
    return texts[i].as_py() if isinstance(texts, pa.Array) else texts[i]


def unspaced(texts: Sequence[str] | pa.Array) -> np.ndarray:
    """Per text: is at least :data:`UNSPACED_TEXT_SHARE` of its non-whitespace characters in
    a script written without spaces (:data:`UNSPACED_SCRIPTS`)?"""
    arr = as_arrow(texts)
    out = np.zeros(len(arr), dtype=bool)
    # those scripts lie above U+0800, so their UTF-8 bytes start with 0xE0 or more: a batch
    # without such a byte has none (one pass over the bytes)
    raw = utf8_bytes(arr)
    if not raw.size or raw.max() < 0xE0:
        return out
    # only texts with a non-ASCII character can hold those scripts (a cheap vectorised test)
    candidates = np.flatnonzero(~pc.string_is_ascii(arr).to_numpy(zero_copy_only=False))
    if not candidates.size:
        return out
    sub = arr.take(pa.array(candidates))
    script = pc.count_substring_regex(sub, UNSPACED_SCRIPTS).to_numpy(zero_copy_only=False)
    spaces = pc.count_substring_regex(sub, r"\s").to_numpy(zero_copy_only=False)
    visible = pc.utf8_length(sub).to_numpy(zero_copy_only=False) - spaces
    out[candidates] = (script > 0) & (script >= UNSPACED_TEXT_SHARE * visible)
    return out


def utf8_bytes(arr: pa.Array) -> np.ndarray:
    """The UTF-8 bytes of all texts of a string array (a slice's own bytes only), no copy."""
    _, offsets, data = arr.buffers()[:3]
    if data is None or not len(arr):
        return np.zeros(0, dtype=np.uint8)
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    bounds = np.frombuffer(offsets, dtype=dtype)[arr.offset:arr.offset + len(arr) + 1]
    return np.frombuffer(data, dtype=np.uint8)[bounds[0]:bounds[-1]]


def split_whitespace(arr: pa.Array) -> pa.ListArray:
    """``pyarrow.compute.utf8_split_whitespace`` (whose whitespace is Python's ``str.isspace``).

    ``ascii_split_whitespace`` splits UTF-8 text into the same words (a multi-byte character
    never holds an ASCII byte) except at 0x1C-0x1F and the whitespace beyond ASCII (U+0085,
    U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000), and is about
    twice as fast; it is used when the texts hold none of those (one pass over the bytes).
    The kernels differ only in how many empty edge tokens follow a run of two or more trailing
    whitespace characters (one vs two), which no metric counts: they all drop empty tokens
    or only ask whether a text has one (tested)."""
    raw = utf8_bytes(arr)
    if ((raw - np.uint8(0x1C)) < 4).any():
        return pc.utf8_split_whitespace(arr)
    lead = np.flatnonzero(raw >= 0xC2)  # lead bytes of the characters from U+0080 on
    lead = lead[raw[lead] <= 0xE3]  # those of the whitespace above lie in C2-E3
    if lead.size:
        last = len(raw) - 1
        b0 = raw[lead]
        b1 = raw[np.minimum(lead + 1, last)]
        b2 = raw[np.minimum(lead + 2, last)]
        space = (((b0 == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0)))
                 | ((b0 == 0xE1) & (b1 == 0x9A) & (b2 == 0x80))
                 | ((b0 == 0xE2) & (b1 == 0x80) & (((b2 >= 0x80) & (b2 <= 0x8A)) | (b2 == 0xA8)
                                                   | (b2 == 0xA9) | (b2 == 0xAF)))
                 | ((b0 == 0xE2) & (b1 == 0x81) & (b2 == 0x9F))
                 | ((b0 == 0xE3) & (b1 == 0x80) & (b2 == 0x80)))
        if space.any():
            return pc.utf8_split_whitespace(arr)
    return pc.ascii_split_whitespace(arr)


def choose_edit_unit(unspaced_pairs: np.ndarray) -> str:
    """``characters`` when at least :data:`UNSPACED_PAIR_RATE` of the pairs are unspaced,
    else ``words``."""
    n = len(unspaced_pairs)
    return "characters" if n and float(np.mean(unspaced_pairs)) >= UNSPACED_PAIR_RATE else "words"


def character_strings(arrow: pa.Array) -> tuple[list[str], np.ndarray]:
    """:func:`characters` of each text, vectorised (pyarrow), and their lengths."""
    kept = pc.replace_substring_regex(pc.utf8_lower(arrow), _NOT_CHARACTER, "")
    return kept.to_pylist(), pc.utf8_length(kept).to_numpy(zero_copy_only=False).astype(np.int32)


# ----------------------------------------------------------------------------- tokenised batch


@dataclass(frozen=True)
class SplitTexts:
    """A batch of texts split on whitespace, each distinct token stored once.

    ``vocab[token_ids[offsets[i]:offsets[i + 1]]]`` are the tokens of ``texts[i]``; pyarrow
    adds empty tokens for leading / trailing whitespace (and for an empty text)."""

    arrow: pa.Array  # string, no nulls
    vocab: list[str]
    token_ids: np.ndarray  # int32, every token of every text, concatenated
    offsets: np.ndarray  # int64, len(texts) + 1

    @classmethod
    def of(cls, texts: Sequence[str] | pa.Array) -> SplitTexts:
        arrow = as_arrow(texts)
        lists = split_whitespace(arrow)
        encoded = pc.dictionary_encode(lists.flatten())
        return cls(arrow=arrow, vocab=encoded.dictionary.to_pylist(),
                   token_ids=encoded.indices.to_numpy(zero_copy_only=False),
                   offsets=lists.offsets.to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return len(self.arrow)

    @cached_property
    def texts(self) -> list[str]:
        """The texts as Python strings (made on first use: most length units never need them)."""
        return self.arrow.to_pylist()

    def per_text_sum(self, per_token: np.ndarray) -> np.ndarray:
        """Sum of a per-token-occurrence array over each text's tokens (every text has at
        least one token, maybe empty, so no segment is empty)."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(per_token, self.offsets[:-1], dtype=np.int64)

    def per_text_count(self, mask: np.ndarray) -> np.ndarray:
        """How many tokens of each text ``mask`` marks (cheap when it marks few)."""
        text = np.searchsorted(self.offsets, np.flatnonzero(mask), side="right") - 1
        return np.bincount(text, minlength=len(self))

    @cached_property
    def empty_counts(self) -> np.ndarray:
        """pyarrow's empty edge tokens per text (0 when the text has no edge whitespace)."""
        if "" not in self.vocab:
            return np.zeros(len(self), dtype=np.int64)
        return self.per_text_count(self.token_ids == self.vocab.index(""))

    def whitespace_counts(self) -> np.ndarray:
        """Whitespace tokens per text, ``len(text.split())`` (int32)."""
        return (np.diff(self.offsets) - self.empty_counts).astype(np.int32)

    def code_strings(self, token_codes: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Each text as a string of one character per token, from a code per distinct token
        (``-1`` drops the token). Returns the strings and their lengths."""
        codes = token_codes[self.token_ids]
        keep = codes >= 0
        counts = np.diff(self.offsets) - self.per_text_count(~keep)
        codes = codes[keep]
        if codes.size and codes.max() >= _MAX_CODES:  # make the codes dense within the batch
            codes = np.unique(codes, return_inverse=True)[1].reshape(-1)
            if codes.max() >= _MAX_CODES:
                raise _TooManyWords
        codes = codes + np.where(codes >= _SURROGATES[0], _SURROGATES[1] - _SURROGATES[0], 0)
        joined = codes.astype("<u4").tobytes().decode("utf-32-le")
        ends = np.cumsum(counts)
        return ([joined[a:b] for a, b in zip((ends - counts).tolist(), ends.tolist())],
                counts.astype(np.int32))

    def word_strings(self) -> tuple[list[str], np.ndarray]:
        """Each text as one character per word (:func:`words`), and its word count."""
        return self.code_strings(_WORD_CODES.codes(self.vocab))


class WordCodes:
    """Whitespace token → code of its word (:func:`normalize_word`; ``-1`` for no word).

    Shared by all batches of the process, so each distinct token is normalised once; cleared
    when it holds :data:`LIMIT` tokens (codes then restart, which is safe: a batch takes all
    its codes under one lock, and codes only need to agree within a batch)."""

    LIMIT = 500_000

    def __init__(self) -> None:
        self._token: dict[str, int] = {}
        self._word: dict[str, int] = {}
        self._lock = threading.Lock()

    def codes(self, tokens: list[str]) -> np.ndarray:
        with self._lock:
            if len(self._token) + len(tokens) > self.LIMIT:
                self._token.clear()
                self._word.clear()
            codes = list(map(self._token.get, tokens))  # a C loop; None for a new token
            if None in codes:
                codes = [self._add(t) if c is None else c for t, c in zip(tokens, codes)]
            return np.array(codes, dtype=np.int64)

    def _add(self, token: str) -> int:
        w = normalize_word(token)
        code = self._word.setdefault(w, len(self._word)) if w else -1
        self._token[token] = code
        return code


_WORD_CODES = WordCodes()


class _TooManyWords(Exception):
    """A batch has more distinct tokens than a string has code points; split the batch."""


# ----------------------------------------------------------------------------- pair metrics


def pair_metrics(chosen: Sequence[str] | pa.Array, rejected: Sequence[str] | pa.Array,
                 unit: LengthUnit,
                 *, threads: int | None = None, edit_unit: str = "words") -> dict[str, np.ndarray]:
    """Per-pair text metrics of ``chosen[i]`` vs ``rejected[i]`` (lists of strings or Arrow
    string arrays without nulls, as the audit's reader gives them), vectorised.

    Returns arrays of length ``n``: ``lev_words`` (Levenshtein distance in ``edit_unit``:
    words, or characters for unspaced scripts), ``lev_norm`` (divided by the longer answer's
    count of that unit, 0 when both are empty), ``len_chosen`` / ``len_rejected`` (in
    ``unit``), ``len_gap`` (chosen − rejected), ``len_ratio`` (chosen / rejected, each length
    at least 1 so it is always finite), ``words_chosen`` / ``words_rejected`` (whitespace
    words; characters with ``edit_unit="characters"``), ``is_identical`` (equal up to
    whitespace), ``is_near_duplicate`` (``lev_norm <= THRESHOLDS.near_duplicate_lev_norm``,
    identical pairs included).

    Batches of :data:`BATCH_PAIRS` pairs run on ``threads`` threads, by default
    :data:`THREADS` (pyarrow, numpy, rapidfuzz and tokenizers release the GIL; about a third
    of the work is Python, so extra threads pay off on idle cores only; see
    ``scripts/bench_audit.py``)."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected texts")
    if edit_unit not in EDIT_UNITS:
        raise PairforgeError(f"edit unit {edit_unit!r}: use one of {', '.join(EDIT_UNITS)}")

    def batch(i: int) -> dict[str, np.ndarray]:
        return _batch_metrics(chosen[i:i + BATCH_PAIRS], rejected[i:i + BATCH_PAIRS], unit,
                              edit_unit)

    starts = range(0, max(len(chosen), 1), BATCH_PAIRS)  # one batch at least, maybe empty
    threads = THREADS if threads is None else threads
    if threads <= 1 or len(starts) == 1:
        return _concat([batch(i) for i in starts])
    with ThreadPoolExecutor(threads) as pool:
        return _concat(list(pool.map(batch, starts)))


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _batch_metrics(chosen: Sequence[str] | pa.Array, rejected: Sequence[str] | pa.Array,
                   unit: LengthUnit, edit_unit: str = "words") -> dict[str, np.ndarray]:
    n = len(chosen)
    if isinstance(chosen, pa.Array) or isinstance(rejected, pa.Array):
        split = SplitTexts.of(pa.concat_arrays([as_arrow(chosen), as_arrow(rejected)]))
    else:
        split = SplitTexts.of([*chosen, *rejected])
    try:
        if edit_unit == "characters":
            word_str, n_words = character_strings(split.arrow)
        else:
            word_str, n_words = split.word_strings()
    except _TooManyWords:
        if n == 1:
            raise PairforgeError("a pair has over a million distinct words; pairforge audit "
                                 "cannot compare it, drop that pair") from None
        h = n // 2
        return _concat([_batch_metrics(chosen[:h], rejected[:h], unit, edit_unit),
                        _batch_metrics(chosen[h:], rejected[h:], unit, edit_unit)])
    lev = cpdist(word_str[:n], word_str[n:], scorer=Levenshtein.distance, workers=1)
    lev = np.asarray(lev, dtype=np.int32).reshape(n)
    lengths = unit.lengths(split)
    words_ws = n_words if edit_unit == "characters" else split.whitespace_counts()
    out = _derived(lev, n_words[:n], n_words[n:], lengths[:n], lengths[n:])
    out["words_chosen"], out["words_rejected"] = words_ws[:n], words_ws[n:]
    # equal up to whitespace implies equal words, so only word-equal pairs need a look
    same_words = np.flatnonzero(lev == 0)
    out["is_identical"] = np.zeros(n, dtype=bool)
    out["is_identical"][same_words] = [
        text_at(chosen, i).split() == text_at(rejected, i).split() for i in same_words.tolist()]
    return out


def _derived(lev: np.ndarray, words_c: np.ndarray, words_r: np.ndarray,
             len_c: np.ndarray, len_r: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics that follow from distances, word counts and lengths (shared with the
    reference implementation, so both define normalisation and ratios the same way)."""
    longer = np.maximum(words_c, words_r).astype(np.float64)
    lev_norm = np.divide(lev, longer, out=np.zeros(len(lev)), where=longer > 0)
    len_c = np.asarray(len_c, dtype=np.int32)
    len_r = np.asarray(len_r, dtype=np.int32)
    return {
        "lev_words": np.asarray(lev, dtype=np.int32),
        "lev_norm": lev_norm,
        "is_near_duplicate": lev_norm <= THRESHOLDS.near_duplicate_lev_norm,
        "len_chosen": len_c,
        "len_rejected": len_r,
        "len_gap": len_c - len_r,
        "len_ratio": np.maximum(len_c, 1) / np.maximum(len_r, 1),
    }


# ----------------------------------------------------------------------------- reference


def word_levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (insert, delete, substitute a word,
    each cost 1): the textbook two-row dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i]
        for j, wb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb)))
        prev = cur
    return prev[-1]


def reference_pair_metrics(chosen: Sequence[str], rejected: Sequence[str],
                           edit_unit: str = "words") -> dict[str, np.ndarray]:
    """:func:`pair_metrics` with whitespace-word lengths (characters with
    ``edit_unit="characters"``), in plain Python (slow; for tests and as the benchmark's
    baseline)."""
    lev, wc, wr, lc, lr, ident = [], [], [], [], [], []
    for c, r in zip(chosen, rejected):
        a, b = (list(characters(c)), list(characters(r))) if edit_unit == "characters" \
            else (words(c), words(r))
        lev.append(word_levenshtein(a, b))
        wc.append(len(a))
        wr.append(len(b))
        tc, tr = c.split(), r.split()
        lc.append(len(a) if edit_unit == "characters" else len(tc))
        lr.append(len(b) if edit_unit == "characters" else len(tr))
        ident.append(tc == tr)
    out = _derived(np.array(lev, dtype=np.int32), np.array(wc), np.array(wr), np.array(lc),
                   np.array(lr))
    out["words_chosen"], out["words_rejected"] = out["len_chosen"], out["len_rejected"]
    out["is_identical"] = np.array(ident, dtype=bool)
    return out
