"""Tokenizer tests: special-token ids and their guard, GPT-2 import, training, save/load, tiktoken-style ranks."""

import json
import pickle
import random

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsft.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog while 42 cats watch from 1999 windows.",
    "Supervised fine-tuning teaches a base model to follow a chat format, one conversation at a time.",
    "def add(a, b):\n    return a + b\n\nprint(add(12345, 678))  # 13023\n",
    "Ünïcödé tëxt, naïve café, 日本語のテキスト, русский текст, and emoji 🙂🚀 appear too.",
    "Numbers like 3.14159, 2718281828 and 1,000,000 should be split into short digit groups.",
    "  Leading spaces,\ttabs\tand\r\nWindows line endings\n\n\nand blank lines matter to byte-level BPE.",
    "Users may type <|user_end|> or <|bos|> in a message; that must stay plain text.",
]


def make_corpus(repeats: int = 30) -> list[str]:
    rng = random.Random(1234)
    lines = []
    for _ in range(repeats):
        line = rng.choice(CORPUS_LINES)
        lines.append(line + f" {rng.randrange(10**6)}")
    return lines + CORPUS_LINES


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train_from_iterator(make_corpus(), vocab_size=509)


@pytest.fixture(scope="module")
def gpt2(shared_data) -> Tokenizer:
    folder = shared_data / "gpt2"
    return Tokenizer.from_gpt2(folder / "vocab.json", folder / "merges.txt")


def random_text(rng: random.Random, length: int) -> str:
    """Mixed scripts, digits, whitespace, punctuation, emoji and special-token spellings."""
    alphabet = "abcxyzABC  \n\t0123456789.,;:!?'\"()[]{}<>|_-+=/\\éüñß日本語дж🙂🚀\u200b"
    pieces = []
    while sum(map(len, pieces)) < length:
        roll = rng.random()
        if roll < 0.05:
            pieces.append(rng.choice(SPECIAL_TOKENS))
        elif roll < 0.25:
            pieces.append(rng.choice(CORPUS_LINES)[: rng.randrange(1, 40)])
        else:
            pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))))
    return "".join(pieces)


def test_gpt2_files_load_with_specials_after_vocabulary(gpt2):
    assert gpt2.base_vocab_size == 50257
    assert gpt2.vocab_size == 50266 == len(gpt2)
    assert [gpt2.encode_special(name) for name in SPECIAL_TOKENS] == list(range(50257, 50266))
    assert gpt2.bos_id == 50257
    # GPT-2's own tokens keep their ids: "Hello world" is two well-known tokens, <|endoftext|> stays at 50256.
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.id_to_token(50256) == "<|endoftext|>"


def test_gpt2_round_trips_unicode(gpt2):
    rng = random.Random(7)
    texts = [random_text(rng, rng.randrange(1, 300)) for _ in range(20)]
    texts.append("naïve café — 日本語 🙂 \r\n\t  trailing spaces   ")
    for text in texts:
        ids = gpt2.encode(text)
        assert all(0 <= i < gpt2.base_vocab_size for i in ids)
        assert gpt2.decode(ids) == text


@pytest.mark.parametrize("name", SPECIAL_TOKENS)
def test_text_spelling_a_special_stays_ordinary(trained, name):
    text = f"before {name} after{name}{name}"
    specials = set(trained.special_ids.values())
    for ids in (trained.encode(text), trained.encode_batch([text, name])[0], trained.encode_batch([name])[0]):
        assert not specials & set(ids), f"{name} in text produced a special id"
    assert trained.decode(trained.encode(text)) == text
    assert trained.decode([trained.encode_special(name)]) == name


def test_gpt2_text_spelling_specials_stays_ordinary(gpt2):
    text = "".join(SPECIAL_TOKENS) + "<|endoftext|>"
    ids = gpt2.encode(text)
    assert max(ids) < 50256  # not even GPT-2's own <|endoftext|>
    assert gpt2.decode(ids) == text


def test_decode_mixes_specials_and_text(trained):
    bos, end = trained.bos_id, trained.encode_special("<|assistant_end|>")
    ids = [bos, *trained.encode("hi there"), end]
    assert trained.decode(ids) == "<|bos|>hi there<|assistant_end|>"
    assert trained.is_special(bos) and not trained.is_special(ids[1])


def test_encode_special_unknown_name_lists_valid_names(trained):
    with pytest.raises(KeyError, match="<|assistant_start|>") as info:
        trained.encode_special("<|system_start|>")
    assert "<|system_start|>" in str(info.value)


def test_decode_rejects_ids_outside_vocabulary(trained):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([1, trained.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([-1])


def test_train_counts_specials_in_vocab_size(trained):
    assert trained.vocab_size == 509
    assert trained.base_vocab_size == 500
    assert trained.special_ids == {name: 500 + k for k, name in enumerate(SPECIAL_TOKENS)}


def test_train_rejects_vocab_below_bytes_and_specials():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_from_iterator(["abc"], vocab_size=256 + 8)


def test_digit_groups_are_at_most_two(trained):
    # The corpus is full of long numbers; an unrestricted pattern would learn 3+ digit tokens from them.
    corpus = [f"{n} {n * 7919} {n * 104729}" for n in range(1, 400)]
    tok = Tokenizer.train_from_iterator(corpus, vocab_size=700)
    for token, _ in tok.mergeable_ranks().items():
        digits = max((len(run) for run in "".join(c if c.isdigit() else " " for c in token.decode("latin-1")).split()),
                     default=0)
        assert digits <= 2, token
    for t in (tok, trained):
        pieces = [t.decode([i]) for i in t.encode("x 1234567 y")]
        assert "".join(pieces) == "x 1234567 y"
        assert all(sum(c.isdigit() for c in p) <= 2 for p in pieces), pieces


def test_save_and_load_give_identical_ids(trained, tmp_path):
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    loaded = Tokenizer.from_file(path)
    rng = random.Random(11)
    texts = [random_text(rng, rng.randrange(0, 200)) for _ in range(30)]
    assert loaded.encode_batch(texts) == trained.encode_batch(texts)
    assert loaded.special_ids == trained.special_ids
    assert loaded.vocab_size == trained.vocab_size
    # Other tools reading the file see the specials as special tokens with the same ids.
    raw = tokenizers.Tokenizer.from_file(str(path))
    assert {name: raw.token_to_id(name) for name in SPECIAL_TOKENS} == trained.special_ids
    assert all(t.special for t in raw.get_added_tokens_decoder().values())


def test_load_rejects_moved_or_partial_specials(trained, tmp_path):
    data = json.loads(trained._hf.to_str())
    moved = json.loads(json.dumps(data))
    # HF assigns added-token ids by list order, so swapping two entries swaps their ids.
    first, second = moved["added_tokens"][0], moved["added_tokens"][1]
    first["content"], second["content"] = second["content"], first["content"]
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(ValueError, match="fixed layout"):
        Tokenizer.from_file(tmp_path / "moved.json")
    partial = json.loads(json.dumps(data))
    partial["added_tokens"] = partial["added_tokens"][:4]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(ValueError, match="missing"):
        Tokenizer.from_file(tmp_path / "partial.json")


def test_pickle_keeps_the_special_guard(trained):
    clone = pickle.loads(pickle.dumps(trained))
    text = "x<|bos|>y<|assistant_end|>"
    assert clone.encode(text) == trained.encode(text)
    assert not set(clone.encode(text)) & set(clone.special_ids.values())
    assert clone.encode_special("<|bos|>") == trained.bos_id


def test_encode_batch_equals_encode_each(trained):
    rng = random.Random(3)
    texts = [random_text(rng, rng.randrange(0, 120)) for _ in range(50)] + ["", " ", "\n"]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
    assert trained.encode_batch(tuple(texts[:5])) == [trained.encode(t) for t in texts[:5]]
    assert trained.encode_batch([]) == []


def test_encode_rejects_non_text(trained):
    with pytest.raises(TypeError, match="item 1"):
        trained.encode_batch(["a", ("b", "c")])
    with pytest.raises(TypeError, match="single str"):
        trained.encode_batch("abc")
    with pytest.raises(TypeError, match="expects str"):
        trained.encode(b"abc")


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_trained_round_trips_any_text(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.base_vocab_size for i in ids)


def reference_rank_bpe(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """Tiktoken's rule, written plainly: repeatedly merge the adjacent pair whose concatenation ranks lowest."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def test_from_mergeable_ranks_matches_original_and_tiktoken_rule(trained):
    ranks = trained.mergeable_ranks()
    assert sorted(ranks.values()) == list(range(trained.base_vocab_size))
    rebuilt = Tokenizer.from_mergeable_ranks(ranks)
    assert rebuilt.special_ids == trained.special_ids
    rng = random.Random(5)
    texts = [random_text(rng, rng.randrange(1, 200)) for _ in range(40)] + CORPUS_LINES
    assert rebuilt.encode_batch(texts) == trained.encode_batch(texts)

    # Reference: split with the backend's pre-tokenizer, then rank-based BPE on each piece's UTF-8 bytes. The byte
    # level maps each byte to one character, so piece lengths walk the text's bytes one to one.
    splitter = trained._hf.pre_tokenizer
    for text in texts[:15]:
        data, offset, expected = text.encode("utf-8"), 0, []
        for piece, _ in splitter.pre_tokenize_str(text):
            expected += reference_rank_bpe(ranks, data[offset : offset + len(piece)])
            offset += len(piece)
        assert offset == len(data)
        assert rebuilt.encode(text) == expected


def test_from_mergeable_ranks_rejects_bad_tables(trained):
    ranks = trained.mergeable_ranks()
    gap = dict(ranks)
    gap[b"zzz-not-a-token"] = len(ranks) + 5
    with pytest.raises(ValueError, match="0..len"):
        Tokenizer.from_mergeable_ranks(gap)
    no_byte = {token: rank for token, rank in ranks.items() if token != b"\x00"}
    no_byte = {token: k for k, (token, _) in enumerate(sorted(no_byte.items(), key=lambda kv: kv[1]))}
    with pytest.raises(ValueError, match="single bytes"):
        Tokenizer.from_mergeable_ranks(no_byte)


def test_foreign_added_tokens_refused_but_in_vocab_specials_kept_as_text(trained):
    with_extra = tokenizers.Tokenizer.from_str(trained._hf.to_str())
    with_extra.add_tokens(["zzzq"])  # would change how text containing it encodes
    with pytest.raises(ValueError, match="'zzzq'"):
        Tokenizer(with_extra)

    data = json.loads(trained._hf.to_str())
    data["added_tokens"] = []
    bare = tokenizers.Tokenizer.from_str(json.dumps(data))
    # Like GPT-2's <|endoftext|>: a special token that is also an ordinary vocabulary entry.
    word = max(bare.get_vocab(with_added_tokens=False), key=len)
    bare.add_special_tokens([tokenizers.AddedToken(word, special=True)])
    wrapped = Tokenizer(bare)
    assert wrapped.special_ids == trained.special_ids
    text = "x " + trained.decode([bare.token_to_id(word)]) + " y"
    assert wrapped.encode(text) == trained.encode(text)


def test_text_that_is_not_unicode_is_named(trained):
    # JSON can spell a lone surrogate; the Rust backend refuses it with an opaque TypeError naming no text.
    from fastsft.tokenizer import TextEncodingError

    with pytest.raises(TextEncodingError, match=r"text 2: not valid Unicode \(lone surrogate U\+D800 at character 1\)"):
        trained.encode_batch(["fine", "also fine", "a\ud800b"])
    with pytest.raises(TextEncodingError, match=r"text 0: .*U\+DFFF at character 0"):
        trained.encode("\udfff")
    with pytest.raises(ValueError, match=r"train_from_iterator: a text is not valid Unicode .*U\+D800"):
        Tokenizer.train_from_iterator(["ok", "x\ud800"], 300)
    assert trained.encode_batch(["a😀b"]) == [trained.encode("a😀b")]  # a surrogate pair in UTF-16 terms is fine


def test_from_file_names_a_file_that_is_no_tokenizer(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ValueError, match=r"vocab.json: not a tokenizer.json that the `tokenizers` library can read"):
        Tokenizer.from_file(tmp_path / "vocab.json")
