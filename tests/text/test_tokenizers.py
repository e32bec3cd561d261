"""Tokenizers against the official goldens (fixtures/openai/tokenizers/goldens.json), the truncation rule and
its warning, and the miniature tokenizer's save/load."""

import gzip
import json
import shutil
import warnings

import pytest
import torch

from difflab.text import (
    TOKENIZER_KINDS,
    CLIPTokenizer,
    GPT2Tokenizer,
    MiniatureTokenizer,
    Tokenizer,
    load_tokenizer,
)

N_CASES = 36


@pytest.fixture(scope="session")
def vocab_dir(fixtures_dir):
    return fixtures_dir / "tokenizers"


@pytest.fixture(scope="session")
def goldens(vocab_dir):
    data = json.loads((vocab_dir / "goldens.json").read_text())
    assert len(data["cases"]) == N_CASES
    return data


@pytest.fixture(scope="session")
def gpt2(vocab_dir):
    return load_tokenizer("gpt2", vocab_dir)


@pytest.fixture(scope="session")
def clip(vocab_dir):
    return load_tokenizer("clip", vocab_dir)


def record_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [str(w.message) for w in caught]


def test_vocabulary_sizes_match_official(gpt2, clip, goldens):
    assert isinstance(gpt2, GPT2Tokenizer) and isinstance(clip, CLIPTokenizer)
    assert (
        (gpt2.n_vocab, gpt2.pad_token)
        == (goldens["glide"]["n_vocab"], goldens["glide"]["pad_token"])
        == (
            50257,
            50256,
        )
    )
    c = goldens["clip"]
    assert (clip.n_vocab, clip.sot_token, clip.eot_token, clip.pad_token) == (
        c["n_vocab"],
        c["sot"],
        c["eot"],
        c["pad_token"],
    )
    assert isinstance(gpt2, Tokenizer) and isinstance(clip, Tokenizer)


@pytest.mark.parametrize("i", range(N_CASES))
def test_glide_matches_golden(gpt2, goldens, i):
    case = goldens["cases"][i]
    ids = gpt2.encode(case["text"])
    assert ids == case["glide_ids"]
    (tokens, mask), msgs = record_warnings(gpt2.padded_tokens_and_mask, ids, goldens["glide"]["text_ctx"])
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.tolist() == case["glide_tokens"]
    assert mask.tolist() == case["glide_mask"]
    assert len(msgs) == (len(ids) > 128)
    # the caption text gives the same as its ids
    (tokens2, mask2), _ = record_warnings(gpt2.padded_tokens_and_mask, case["text"], 128)
    assert torch.equal(tokens, tokens2) and torch.equal(mask, mask2)


@pytest.mark.parametrize("i", range(N_CASES))
def test_clip_and_karlo_match_golden(clip, goldens, i):
    case = goldens["cases"][i]
    ids = clip.encode(case["text"])
    assert ids == case["clip_ids"]
    text_ctx = goldens["clip"]["text_ctx"]
    (tokens, length), msgs = record_warnings(clip.padded_tokens_and_len, ids, text_ctx)
    assert tokens.dtype == torch.long
    assert tokens.tolist() == case["clip_tokens"]
    assert length == case["clip_len"]
    assert len(msgs) == (len(ids) > text_ctx - 2)
    (k_tokens, k_mask), k_msgs = record_warnings(clip.padded_tokens_and_mask, case["text"], text_ctx)
    assert k_tokens.dtype == torch.int32 and k_mask.dtype == torch.bool
    assert k_tokens.tolist() == case["karlo_tokens"]
    assert k_mask.tolist() == case["karlo_mask"]
    assert len(k_msgs) == len(msgs)


def test_truncation_warning_names_caption_and_count(gpt2, clip, goldens):
    case = next(c for c in goldens["cases"] if c["kind"] == "long")
    n_glide, n_clip = len(case["glide_ids"]), len(case["clip_ids"])
    assert (n_glide, n_clip) == (161, 160)
    _, msgs = record_warnings(gpt2.padded_tokens_and_mask, case["text"], 128)
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "the quick brown fox" in msgs[0] and "161 tokens" in msgs[0] and f"cut {161 - 128}" in msgs[0]
    for fn in (clip.padded_tokens_and_len, clip.padded_tokens_and_mask):
        _, msgs = record_warnings(fn, case["text"], 77)
        assert len(msgs) == 1 and "\n" not in msgs[0]
        assert "the quick brown fox" in msgs[0] and "160 tokens" in msgs[0] and f"cut {160 - 75}" in msgs[0]
    # the warning points at the caller's line, not at difflab's internals
    for fn in (gpt2.padded_tokens_and_mask, clip.padded_tokens_and_mask, clip.padded_tokens_and_len):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(case["text"], 64)
        assert [w.filename for w in caught] == [__file__]
    # given ids, the warning names the decoded start of the caption
    _, msgs = record_warnings(clip.padded_tokens_and_len, case["clip_ids"], 77)
    assert "the quick brown fox" in msgs[0]
    # at the limit nothing is cut and nothing is said
    at_limit = next(c for c in goldens["cases"] if len(c["clip_ids"]) == 75)
    _, msgs = record_warnings(clip.padded_tokens_and_mask, at_limit["text"], 77)
    assert msgs == []


def test_decode_inverts_encode(gpt2, clip):
    text = "a corgi wearing a red bowtie, café 日本語 🚀"
    assert gpt2.decode(gpt2.encode(text)) == text.lower()
    assert clip.decode(clip.encode(text)) == "a corgi wearing a red bowtie , café 日本語 🚀 "


def test_plain_vocabulary_files_equal_gzipped(vocab_dir, tmp_path, gpt2, clip, goldens):
    for name in ("encoder.json", "vocab.bpe", "bpe_simple_vocab_16e6.txt"):
        with gzip.open(vocab_dir / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain_gpt2 = GPT2Tokenizer(tmp_path)
    plain_clip = CLIPTokenizer(tmp_path / "bpe_simple_vocab_16e6.txt")
    for case in goldens["cases"][:12]:
        assert plain_gpt2.encode(case["text"]) == case["glide_ids"]
        assert plain_clip.encode(case["text"]) == case["clip_ids"]


def test_bad_inputs_name_the_problem(tmp_path, gpt2, clip):
    with pytest.raises(ValueError, match="gpt2, clip, miniature"):
        load_tokenizer("t5", tmp_path)
    assert TOKENIZER_KINDS == ("gpt2", "clip", "miniature")
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_tokenizer("gpt2", tmp_path)
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt"):
        load_tokenizer("clip", tmp_path)
    with pytest.raises(ValueError, match="text_ctx"):
        clip.padded_tokens_and_len("a cat", 1)
    with pytest.raises(ValueError, match="text_ctx"):
        gpt2.padded_tokens_and_mask("a cat", 0)


# --- miniature ---------------------------------------------------------------------------------------------

CAPTIONS = [
    "a small red 7 in the top left",
    "a green seven on the left and a blue 3 on the right",
    "A big blue 0 at the bottom.",
]


def test_miniature_vocabulary_and_ids():
    tok = MiniatureTokenizer.from_captions(CAPTIONS)
    words = sorted(
        {
            "a",
            "small",
            "red",
            "7",
            "in",
            "the",
            "top",
            "left",
            "green",
            "seven",
            "on",
            "and",
            "blue",
            "3",
            "right",
            "big",
            "0",
            "at",
            "bottom",
            ".",
        }
    )
    assert tok.words == words
    assert tok.n_vocab == 4 + len(words)
    assert (tok.pad_token, tok.sot_token, tok.eot_token, tok.unk_token) == (0, 1, 2, 3)
    assert tok.encode("A Red 7, seven") == [
        4 + words.index("a"),
        4 + words.index("red"),
        4 + words.index("7"),
        3,
        4 + words.index("seven"),
    ]
    tokens, mask = tok.padded_tokens_and_mask("a red 7", 6)
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [1, *tok.encode("a red 7"), 2, 0]
    assert mask.tolist() == [True] * 5 + [False]
    empty, empty_mask = tok.padded_tokens_and_mask("", 4)
    assert empty.tolist() == [1, 2, 0, 0] and empty_mask.tolist() == [True, True, False, False]


def test_miniature_truncation_rule_and_warning():
    tok = MiniatureTokenizer.from_captions(CAPTIONS)
    ids = tok.encode(CAPTIONS[1])
    assert len(ids) == 13
    (tokens, mask), msgs = record_warnings(tok.padded_tokens_and_mask, CAPTIONS[1], 8)
    assert tokens.tolist() == [1, *ids[:6], 2]
    assert mask.all()
    assert len(msgs) == 1 and "a green seven" in msgs[0] and "13 tokens" in msgs[0] and "cut 7" in msgs[0]
    (tokens2, _), _ = record_warnings(tok.padded_tokens_and_mask, ids, 8)
    assert torch.equal(tokens, tokens2)
    _, msgs = record_warnings(tok.padded_tokens_and_mask, CAPTIONS[1], 15)
    assert msgs == []
    _, msgs = record_warnings(tok.padded_tokens_and_mask, CAPTIONS[1], 14)
    assert len(msgs) == 1 and "cut 1" in msgs[0]


def test_miniature_save_load_round_trip(tmp_path):
    tok = MiniatureTokenizer.from_captions(CAPTIONS)
    written = tok.save(tmp_path)
    assert written == tmp_path / "tokenizer.json"
    for loaded in (MiniatureTokenizer.load(written), load_tokenizer("miniature", tmp_path)):
        assert loaded.words == tok.words and loaded.n_vocab == tok.n_vocab
        for caption in [*CAPTIONS, "a purple 9"]:
            assert loaded.encode(caption) == tok.encode(caption)
            expected = tok.padded_tokens_and_mask(caption, 16)[0]
            assert torch.equal(loaded.padded_tokens_and_mask(caption, 16)[0], expected)
    assert isinstance(loaded, Tokenizer)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"format": "something else", "version": 1, "words": ["a"]}),
        json.dumps({"format": "difflab.miniature_tokenizer", "version": 99, "specials": [], "words": ["a"]}),
        json.dumps(
            {
                "format": "difflab.miniature_tokenizer",
                "version": 1,
                "specials": ["<pad>", "<sot>", "<eot>", "<unk>"],
                "words": ["b", "a"],
            }
        ),
        json.dumps(
            {
                "format": "difflab.miniature_tokenizer",
                "version": 1,
                "specials": ["<pad>", "<sot>", "<eot>", "<unk>"],
                "words": ["a b"],
            }
        ),
        json.dumps(
            {
                "format": "difflab.miniature_tokenizer",
                "version": 1,
                "specials": ["<pad>", "<sot>", "<eot>", "<unk>"],
                "words": [1, 2],
            }
        ),
    ],
)
def test_miniature_rejects_corrupt_file(tmp_path, content):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json"):
        MiniatureTokenizer.load(bad)


def test_miniature_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nothing.json"):
        MiniatureTokenizer.load(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer("miniature", tmp_path)
