"""GPT-2 tokenizer loading: the bundled offline copy or any Hugging Face hub name."""

from __future__ import annotations

import functools

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hivetrain.assets import TOKENIZER_DIR
from hivetrain.log import get_logger

logger = get_logger(__name__)

BUNDLED = "bundled"


def load_tokenizer(name: str = BUNDLED) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer by name; ``bundled`` is GPT-2 BPE shipped in ``hivetrain/assets``.

    Any other name goes to ``AutoTokenizer.from_pretrained`` (a hub id such as
    ``openai-community/gpt2`` or a local folder). The result is cached per name, so
    callers share one instance and must not mutate it.
    """
    return _load_cached(name)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str) -> PreTrainedTokenizerFast:
    source = str(TOKENIZER_DIR) if name == BUNDLED else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=name == BUNDLED)
    except Exception as exc:  # hub/network boundary: any failure becomes a fix-it message
        raise ValueError(
            f"could not load tokenizer {name!r} ({type(exc).__name__}: {exc}); the Hugging Face hub may be "
            f"unreachable or the name/path is wrong. Use {BUNDLED!r} for the offline GPT-2 tokenizer."
        ) from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {name!r} must be a fast tokenizer with an EOS token, got {type(tokenizer).__name__} "
            f"with eos_token_id={tokenizer.eos_token_id}; use {BUNDLED!r} or a GPT-2 compatible tokenizer."
        )
    logger.info("loaded tokenizer %r: %d tokens, eos id %d", name, len(tokenizer), tokenizer.eos_token_id)
    return tokenizer
