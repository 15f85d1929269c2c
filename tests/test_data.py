"""Tests for hivetrain.data: sources, sharding, blocking and addressable block streams."""

import gzip
import hashlib
import itertools
import json
import logging
import re
import socket
import subprocess
import sys
from collections import Counter

import datasets
import pytest
import torch

from hivetrain.assets import ASSETS_DIR, sotu_file
from hivetrain.data import (
    BUNDLED_DATASET,
    BlockStream,
    buffer_shuffle,
    iter_blocks,
    load_texts,
    shard_for,
    shard_texts,
    validation_blocks,
)
from hivetrain.protocol.binding import identity_peer_id, new_ed25519_identity
from hivetrain.tokenizer import load_tokenizer

NUM_DOCS = 12


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _doc(i):
    # "zq<i>" markers are unique per document and survive decoding intact.
    return f"Document zq{i} begins. " + " ".join(f"word{i}x{j}" for j in range(5 + i)) + f" Ends zq{i}."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder with train.jsonl (NUM_DOCS docs) and validation.jsonl.gz (2 docs)."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": _doc(i)}) + "\n" for i in range(NUM_DOCS)))
    with gzip.open(folder / "validation.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": _doc(100 + i)}) + "\n" for i in range(2)))
    return folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _markers(text):
    return {int(m) for m in re.findall(r"zq(\d+)", text)}


def _pass_text(stream, tokenizer, pass_index=0):
    n = stream.blocks_per_pass
    return tokenizer.decode(stream.get_batch(pass_index * n, n).flatten())


# --- sharding -------------------------------------------------------------------------


SALT = "0123456789abcdef0123456789abcdef"
HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # the well-known dev hotkey //Alice


def test_shard_for_is_stable_and_spreads_hotkeys():
    # Pinned values: a change here would silently move every miner to another shard.
    assert shard_for(HOTKEY, SALT, 64) == 31
    assert shard_for(HOTKEY, SALT, 1000) == 511
    digest = hashlib.sha256(f"hivetrain-shard/1\n{SALT}\n{HOTKEY}".encode()).digest()
    assert shard_for(HOTKEY, SALT, 1000) == int.from_bytes(digest[:8], "big") % 1000  # the documented encoding
    counts = Counter(shard_for(f"5Hotkey{i}", SALT, 8) for i in range(800))
    assert sorted(counts) == list(range(8)) and all(60 <= n <= 140 for n in counts.values()), counts
    assert shard_for(HOTKEY, SALT, 1) == 0


@pytest.mark.parametrize("num_shards", [0, -1, 1.5, "2"])
def test_shard_for_rejects_bad_num_shards(num_shards):
    with pytest.raises(ValueError, match="num_shards"):
        shard_for(HOTKEY, SALT, num_shards)


@pytest.mark.parametrize(("hotkey", "salt"), [("", SALT), (HOTKEY, ""), (HOTKEY, SALT + "\n5Other"), (None, SALT)])
def test_shard_for_refuses_fields_that_would_blur_the_encoding(hotkey, salt):
    with pytest.raises(ValueError, match="one-line string"):
        shard_for(hotkey, salt, 64)


def test_minting_peer_ids_never_moves_a_miners_shard():
    """The attack: mint libp2p identities (free) until one lands in a chosen shard, e.g. a victim's.
    Under the old rule (sha256 of the peer id) 64 minted ids reach most of 64 shards; the shard now
    follows the hotkey and the run's salt only, so with one hotkey all 64 stay in one shard."""
    peer_ids = {identity_peer_id(new_ed25519_identity()) for _ in range(64)}
    assert len(peer_ids) == 64
    old_rule = {int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") % 64 for p in peer_ids}
    assert len(old_rule) > 20  # what grinding used to buy: ~40 of 64 shards to pick from
    # the miner (hivetrain.miner.train) and the validator (SpotChecker.stream_for) derive the shard from
    # what a miner cannot mint for free: whichever of its ids it runs under, it trains on the hotkey's shard
    assert {peer_id: shard_for(HOTKEY, SALT, 64) for peer_id in peer_ids} == dict.fromkeys(peer_ids, 31)
    # the run's salt does decide: another salt moves most hotkeys, so a mapping ground before the run is useless
    hotkeys = [f"5Hotkey{i}" for i in range(32)]
    moved = [h for h in hotkeys if shard_for(h, SALT, 64) != shard_for(h, "f" * 32, 64)]
    assert len(moved) > 16


def test_shard_texts_assigns_by_position():
    docs = [f"d{i}" for i in range(10)]
    assert list(shard_texts(docs, 3, 1)) == ["d1", "d4", "d7"]
    shards = [list(shard_texts(docs, 3, s)) for s in range(3)]
    assert sorted(itertools.chain(*shards)) == sorted(docs)


@pytest.mark.parametrize("num_shards,shard", [(3, 3), (3, -1), (0, 0), (2, None)])
def test_shard_texts_rejects_bad_args(num_shards, shard):
    with pytest.raises(ValueError):
        list(shard_texts(["a"], num_shards, shard))


def test_buffer_shuffle_is_deterministic_permutation():
    items = list(range(50))
    first = list(buffer_shuffle(items, "7:0", buffer_size=8))
    assert first == list(buffer_shuffle(items, "7:0", buffer_size=8))
    assert sorted(first) == items and first != items
    assert list(buffer_shuffle(items, "7:1", buffer_size=8)) != first


# --- blocking -------------------------------------------------------------------------


def test_iter_blocks_concatenates_documents_with_eos(tokenizer):
    docs = [_doc(i) for i in range(6)]
    expected = []
    for doc in docs:
        expected += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    blocks = list(iter_blocks(docs, tokenizer, block_size=32))
    assert len(blocks) == len(expected) // 32 > 2
    assert all(b.shape == (32,) and b.dtype == torch.int64 for b in blocks)
    assert torch.cat(blocks).tolist() == expected[: len(blocks) * 32]  # remainder dropped


def test_iter_blocks_rejects_bad_block_size(tokenizer):
    with pytest.raises(ValueError, match="block_size"):
        list(iter_blocks(["x"], tokenizer, block_size=0))


# --- sources --------------------------------------------------------------------------


def test_bundled_splits_load_offline_and_are_disjoint_by_year(no_network):
    years = {}
    for split in ("train", "validation"):
        rows = list(datasets.load_dataset("json", data_files=str(sotu_file(split)), split="train", streaming=True))
        assert all(row["text"] and row["name"] for row in rows)
        years[split] = [row["year"] for row in rows]
        # read without datasets (a second of imports saved at every start): the same documents in the same order
        assert list(load_texts(BUNDLED_DATASET, split)) == [row["text"] for row in rows]
    assert (len(years["train"]), len(years["validation"])) == (219, 14)
    assert max(years["train"]) < min(years["validation"])
    assert years["train"][0] == 1790 and years["validation"][-1] == 2021


def test_readme_checksums_match_sotu_files():
    readme = (ASSETS_DIR / "README.md").read_text()
    for split in ("train", "validation"):
        digest = hashlib.sha256(sotu_file(split).read_bytes()).hexdigest()
        assert re.search(rf"`sotu/{split}.jsonl.gz`.*{digest}", readme), split


def test_local_folder_picks_split_files(corpus):
    assert list(load_texts(str(corpus), "train", "body")) == [_doc(i) for i in range(NUM_DOCS)]
    assert list(load_texts(str(corpus), "validation", "body")) == [_doc(100), _doc(101)]
    assert list(load_texts(str(corpus / "train.jsonl"), "train", "body"))[0] == _doc(0)


def test_empty_rows_are_skipped_before_sharding(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "", "b", None, "c", "d"]))
    assert list(load_texts(str(path))) == ["a", "b", "c", "d"]
    assert list(shard_texts(load_texts(str(path)), 2, 1)) == ["b", "d"]


def test_local_text_file_is_split_into_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First para\nline two.\n\nSecond para.\n")
    assert [t.strip() for t in load_texts(str(path))] == ["First para\nline two.", "Second para."]


@pytest.mark.parametrize(
    "dataset,split,key,match",
    [
        ("bundled:nope", "train", "text", "unknown bundled"),
        (BUNDLED_DATASET, "test", "text", "splits"),
        ("/no/such/data.jsonl", "train", "text", "does not exist"),
        (BUNDLED_DATASET, "train", "content", "no column 'content'"),
    ],
)
def test_load_texts_errors_say_how_to_fix(dataset, split, key, match):
    with pytest.raises(ValueError, match=match):
        list(itertools.islice(load_texts(dataset, split, key), 1))


# --- block streams --------------------------------------------------------------------


def _stream(corpus, tokenizer, **kwargs):
    args = dict(dataset=str(corpus), text_key="body", tokenizer=tokenizer, block_size=16, num_shards=3, shard=0)
    args["materialize"] = True
    return BlockStream(**{**args, **kwargs})


def test_shards_hold_disjoint_documents(corpus, tokenizer):
    seen = [_markers(_pass_text(_stream(corpus, tokenizer, shard=s), tokenizer)) for s in range(3)]
    for s in range(3):
        # Shard s owns documents s, s+3, ...; a dropped tail may cut off the last marker only.
        assert seen[s] <= set(range(s, NUM_DOCS, 3)) and len(seen[s]) >= 3


@pytest.mark.parametrize("materialize", [True, False])
def test_iteration_matches_get_block_across_passes(corpus, tokenizer, materialize):
    stream = _stream(corpus, tokenizer, materialize=materialize, seed=3)
    iterated = list(itertools.islice(stream, 60))
    per_pass = stream.blocks_per_pass
    assert 10 < per_pass < 30  # so 60 blocks wrap around at least twice
    assert [i for i, _ in iterated] == list(range(60))
    fresh = _stream(corpus, tokenizer, materialize=materialize, seed=3)
    for index in (0, 1, per_pass - 1, per_pass, 2 * per_pass + 1, 59):
        assert torch.equal(fresh.get_block(index), iterated[index][1])
    across_wrap = torch.stack([block for _, block in iterated[per_pass - 2 : per_pass + 2]])
    assert torch.equal(fresh.get_batch(per_pass - 2, 4), across_wrap)


def test_streamed_and_materialized_blocks_are_identical(corpus, tokenizer):
    kept = _stream(corpus, tokenizer, materialize=True, seed=5)
    streamed = _stream(corpus, tokenizer, materialize=False, seed=5)
    assert torch.equal(kept.get_batch(0, 40), streamed.get_batch(0, 40))


def test_each_pass_reshuffles_the_same_documents(corpus, tokenizer):
    stream = _stream(corpus, tokenizer, num_shards=1, seed=0)
    first, second = _pass_text(stream, tokenizer, 0), _pass_text(stream, tokenizer, 1)
    assert first != second
    assert _markers(first) | _markers(second) == set(range(NUM_DOCS))
    unshuffled = _stream(corpus, tokenizer, num_shards=1, seed=None)
    assert torch.equal(unshuffled.get_block(0), unshuffled.get_block(unshuffled.blocks_per_pass))
    assert _pass_text(unshuffled, tokenizer).startswith(_doc(0) + "<|endoftext|>")


def test_new_pass_is_logged(corpus, tokenizer):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("hivetrain.data").addHandler(handler)
    try:
        stream = _stream(corpus, tokenizer)
        list(itertools.islice(stream, stream.blocks_per_pass + 1))
    finally:
        logging.getLogger("hivetrain.data").removeHandler(handler)
    assert sum("pass 1 from block" in r.getMessage() for r in records) == 1


def test_batches_match_get_batch(corpus, tokenizer):
    stream = _stream(corpus, tokenizer)
    got = list(itertools.islice(stream.batches(4, start_index=2), 3))
    assert [first for first, _ in got] == [2, 6, 10]
    for first, batch in got:
        assert batch.shape == (4, 16) and batch.dtype == torch.int64
        assert torch.equal(batch, stream.get_batch(first, 4))


def test_bundled_stream_on_a_small_shard(tokenizer, no_network):
    stream = BlockStream(tokenizer=tokenizer, block_size=64, num_shards=40, shard=7)
    block = stream.get_block(stream.blocks_per_pass + 3)
    assert block.shape == (64,) and block.dtype == torch.int64
    assert torch.equal(block, next(stream.iter_from(stream.blocks_per_pass + 3, log=False))[1])


def test_block_stream_rejects_bad_args(corpus, tokenizer):
    for kwargs in ({"num_shards": 0}, {"shard": 3}, {"shard": -1}, {"block_size": 0}):
        with pytest.raises(ValueError):
            _stream(corpus, tokenizer, **kwargs)
    with pytest.raises(ValueError, match="block_index"):
        _stream(corpus, tokenizer).get_block(-1)
    with pytest.raises(ValueError, match="less than one block"):
        _stream(corpus, tokenizer, num_shards=NUM_DOCS + 1, shard=NUM_DOCS, block_size=16).get_block(0)


def test_validation_blocks_are_the_first_validation_tokens(tokenizer, no_network):
    blocks = validation_blocks(tokenizer, block_size=32, max_blocks=5)
    assert blocks.shape == (5, 32) and blocks.dtype == torch.int64
    first_speech = next(load_texts(BUNDLED_DATASET, "validation"))
    assert blocks.flatten().tolist() == tokenizer(first_speech)["input_ids"][:160]
    assert torch.equal(blocks, validation_blocks(tokenizer, 32, 5))


def test_validation_blocks_stop_at_the_end_of_a_short_split(corpus, tokenizer):
    blocks = validation_blocks(tokenizer, 16, 1000, dataset=str(corpus), text_key="body")
    assert 0 < blocks.shape[0] < 1000
    with pytest.raises(ValueError, match="max_blocks"):
        validation_blocks(tokenizer, 16, 0)


def test_a_miner_on_the_bundled_corpus_does_not_import_datasets():
    # issue 27 (join time): datasets costs a second of imports, and only data other than the bundled corpus needs it
    code = (
        "import sys\n"
        "from hivetrain.data import BUNDLED_DATASET, load_texts\n"
        "import hivetrain.miner.train, hivetrain.validator.service\n"
        "assert next(iter(load_texts(BUNDLED_DATASET, 'train')))\n"
        "print('datasets' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
