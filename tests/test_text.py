"""Text normalisation, comparison keys, tokens and shingles (stages/lib/text.py)."""
from __future__ import annotations

import re
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib.text import dedup_key, normalize_text, shingles, word_bytes, words


def test_nfc_composes_accents():
    assert normalize_text("cafe\u0301") == "caf\u00e9"


def test_crlf_and_cr_become_lf():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"


def test_control_characters_removed_but_newline_and_tab_kept():
    assert normalize_text("a\x00b\x07c\x1b[0m\td\ne\x7f") == "abc[0m\td\ne"


def test_invisible_format_characters_removed():
    assert normalize_text("\ufeffzero\u200bwidth\u00adsoft") == "zerowidthsoft"


def test_runs_of_spaces_collapse_and_ends_are_stripped():
    # Spaces at a line's start stay (indentation in code answers); spaces before a newline go.
    assert normalize_text("  many    spaces\u00a0\u00a0here \n  next  ") == "many spaces here\n next"


def test_plain_ascii_is_returned_unchanged():
    text = "Hello, world.\nSecond line\twith a tab."
    assert normalize_text(text) is text


def _reference_normalize(text: str) -> str:
    """The slow path spelled out, to check the ASCII fast path never skips needed work."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f\ufeff\u200b\u200c\u200d\u2060\u00ad]", "", text)
    text = unicodedata.normalize("NFC", text)
    text = re.sub("[ \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+", " ", text)
    text = re.sub("[ \t]+\n", "\n", text)
    return text.strip()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \t\n\r\x00\x07\u00a0\u0301e\u200b.")), max_size=40))
def test_normalize_matches_reference_and_is_idempotent(text):
    once = normalize_text(text)
    assert once == _reference_normalize(text)
    assert normalize_text(once) == once


def test_dedup_key_ignores_case_and_spacing():
    assert dedup_key("Hello   World\n") == dedup_key("hello world") == "hello world"
    assert dedup_key("Straße") == dedup_key("STRASSE")


def test_words_drop_punctuation_and_casefold():
    assert words("Hi, THERE! it's 2024.") == ["hi", "there", "it", "s", "2024"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_word_bytes_fast_path_matches_words(text):
    assert word_bytes(text) == [w.encode("utf-8") for w in words(text)]


def test_shingles_distinct_in_order_and_short_texts_are_one_shingle():
    assert shingles(["a", "b", "c", "a", "b", "c"], 3) == ["a b c", "b c a", "c a b"]
    assert shingles(["a", "b"], 3) == ["a b"]
    assert shingles([], 3) == []
