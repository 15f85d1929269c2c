"""Tests for hivetrain.tokenizer and the bundled GPT-2 tokenizer files."""

import hashlib
import re

import pytest
from transformers import PreTrainedTokenizerFast

from hivetrain.assets import ASSETS_DIR, TOKENIZER_DIR
from hivetrain.tokenizer import BUNDLED, load_tokenizer


def test_bundled_encodes_like_gpt2():
    tokenizer = load_tokenizer(BUNDLED)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    # Multi-merge words and a leading space exercise merges.txt, not just vocab.json.
    assert tokenizer(" The quick brown fox")["input_ids"] == [383, 2068, 7586, 21831]
    text = " naïve café, 1776!\n\nNew paragraph"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_bundled_special_tokens_and_size():
    tokenizer = load_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 50256
    assert len(tokenizer) == 50257
    assert tokenizer("a<|endoftext|>b")["input_ids"] == [64, 50256, 65]


def test_load_is_cached_per_name():
    assert load_tokenizer() is load_tokenizer(BUNDLED)


def test_bad_names_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="bundled"):
        load_tokenizer(str(tmp_path))  # a folder without tokenizer files
    with pytest.raises(ValueError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path / "missing" / "folder"))


def test_readme_checksums_match_tokenizer_files():
    readme = (ASSETS_DIR / "README.md").read_text()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        digest = hashlib.sha256((TOKENIZER_DIR / name).read_bytes()).hexdigest()
        assert re.search(rf"`tokenizer/{re.escape(name)}`.*{digest}", readme), name
