"""The C++ renderer (fastsft.packing.render_batch) against the Python reference fastsft.chat.render_conversation.

Random conversations cover tool parts, system messages, multi-turn, unicode (emoji, CJK, combining marks), empty
strings, text spelling special tokens, and truncation at small max_tokens; each batch is one render_batch call.
"""

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsft import _C
from fastsft.chat import ConversationError, render_conversation
from fastsft.packing import RenderedBatch, render_batch, render_batch_flat
from fastsft.tokenizer import SPECIAL_TOKENS, Tokenizer

# Pieces of text that stress the tokenizer and the span bookkeeping.
TEXT_PIECES = [
    "hello", "world", " the", " answer", "is", "42", "3.14159", "\n", "\n\n", "  ", "\t", "def f(x):\n    return x * 2",
    "print(f(21))", "😀", "🎉🎉", "👍🏽", "👨‍👩‍👧", "中文", "日本語のテキスト", "한국어", "e\u0301", "a\u0308\u0323", "naïve café",
    "Ωμέγα", "עברית", "<|user_end|>", "<|bos|>", "<|assistant_start|>", "<|python_start|>x", "<|", "|>", "<|output_end",
    "",
]


def random_text(rng: random.Random, max_pieces: int = 12) -> str:
    return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(0, max_pieces)))


def random_conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": random_text(rng)})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": random_text(rng)})
        if rng.random() < 0.1:
            break  # a conversation may end on a user message
        if rng.random() < 0.5:
            content = random_text(rng)
        else:
            kinds = ["text", "python", "python_output"]
            content = [{"type": rng.choice(kinds), "text": random_text(rng)} for _ in range(rng.randint(0, 5))]
        messages.append({"role": "assistant", "content": content})
    return {"messages": messages}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(1)
    corpus = [random_text(rng, 60) for _ in range(400)]
    return Tokenizer.train_from_iterator(corpus, 420)


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    rng = random.Random(2024)
    return [random_conversation(rng) for _ in range(1200)]


def assert_matches_reference(tokenizer, conversations, rendered, max_tokens):
    assert len(rendered) == len(conversations)
    for i, (conversation, (ids, mask)) in enumerate(zip(conversations, rendered)):
        ref_ids, ref_mask = render_conversation(tokenizer, conversation, max_tokens=max_tokens)
        assert ids.dtype == np.int32 and mask.dtype == np.uint8
        assert ids.tolist() == ref_ids, f"conversation {i}: ids differ"
        assert mask.tolist() == ref_mask, f"conversation {i}: mask differs"


def test_render_batch_matches_reference(tokenizer, conversations):
    rendered = render_batch(tokenizer, conversations)
    assert_matches_reference(tokenizer, conversations, rendered, 2048)
    # The generator must really produce what this test claims to cover.
    all_ids = np.concatenate([ids for ids, _ in rendered])
    for name in SPECIAL_TOKENS:
        assert (all_ids == tokenizer.encode_special(name)).any(), name
    assert any(m["role"] == "system" for c in conversations for m in c["messages"])


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17, 64])
def test_render_batch_truncates_like_reference(tokenizer, conversations, max_tokens):
    batch = conversations[:300]
    rendered = render_batch(tokenizer, batch, max_tokens=max_tokens)
    assert_matches_reference(tokenizer, batch, rendered, max_tokens)
    assert max(len(ids) for ids, _ in rendered) == max_tokens


def test_flat_form_is_the_list_form_back_to_back(tokenizer, conversations):
    batch = conversations[:200]
    flat = render_batch_flat(tokenizer, batch, max_tokens=100)
    pairs = render_batch(tokenizer, batch, max_tokens=100)
    assert isinstance(flat, RenderedBatch) and len(flat) == len(batch)
    assert flat.offsets.dtype == np.int64 and flat.offsets[0] == 0
    assert flat.lengths.tolist() == [len(ids) for ids, _ in pairs]
    assert np.array_equal(flat.ids, np.concatenate([ids for ids, _ in pairs]))
    assert np.array_equal(flat.mask, np.concatenate([mask for _, mask in pairs]))
    ids, mask = flat[7]
    assert np.array_equal(ids, pairs[7][0]) and np.array_equal(mask, pairs[7][1])


conversation_strategy = st.builds(
    random_conversation, st.integers(min_value=0, max_value=2**32).map(random.Random)
)
unicode_text = st.text(max_size=20)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(conversation_strategy, min_size=0, max_size=30),
    extra_user=unicode_text,
    extra_assistant=unicode_text,
    max_tokens=st.integers(min_value=1, max_value=300),
)
def test_render_batch_matches_reference_hypothesis(tokenizer, batch, extra_user, extra_assistant, max_tokens):
    # Arbitrary unicode from hypothesis (surrogates excluded by st.text) on top of the curated pieces.
    batch = batch + [{"messages": [{"role": "user", "content": extra_user},
                                   {"role": "assistant", "content": [{"type": "text", "text": extra_assistant}]}]}]
    rendered = render_batch(tokenizer, batch, max_tokens=max_tokens)
    assert_matches_reference(tokenizer, batch, rendered, max_tokens)


def test_render_batch_gpt2_on_real_alpaca(shared_data):
    tokenizer = Tokenizer.from_gpt2(shared_data / "gpt2" / "vocab.json", shared_data / "gpt2" / "merges.txt")
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:300]
    batch = [
        {"messages": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
                      {"role": "assistant", "content": r["output"]}]}
        for r in rows
    ]
    rendered = render_batch(tokenizer, batch, max_tokens=256)
    assert_matches_reference(tokenizer, batch, rendered, 256)


class CountingTokenizer:
    """Forwards to a real tokenizer and counts the encode calls."""

    def __init__(self, inner):
        self.inner = inner
        self.encode_calls = 0
        self.encode_batch_calls = 0

    def encode(self, text):
        self.encode_calls += 1
        return self.inner.encode(text)

    def encode_batch(self, texts):
        self.encode_batch_calls += 1
        return self.inner.encode_batch(texts)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_one_encode_batch_call_per_batch(tokenizer, conversations):
    counting = CountingTokenizer(tokenizer)
    render_batch(counting, conversations[:100])
    assert (counting.encode_batch_calls, counting.encode_calls) == (1, 0)


def test_empty_batch(tokenizer):
    flat = render_batch_flat(tokenizer, [])
    assert len(flat) == 0 and flat.offsets.tolist() == [0] and len(flat.ids) == 0
    assert render_batch(tokenizer, []) == []


def test_bad_conversation_error_names_its_batch_index(tokenizer, conversations):
    batch = list(conversations[:5]) + [{"messages": [{"role": "assistant", "content": "first"}]}]
    with pytest.raises(ConversationError) as info:
        render_batch(tokenizer, batch)
    assert info.value.index == 5


@pytest.mark.parametrize("max_tokens", [0, -3, 2.5, True])
def test_bad_max_tokens(tokenizer, conversations, max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        render_batch(tokenizer, conversations[:2], max_tokens=max_tokens)


def _assemble_args():
    tokens = np.array([5, 6, 7], dtype=np.int32)
    span_offsets = np.array([0, 2, 3], dtype=np.int64)
    # special 100 mask 0, next span mask 0, special 101 mask 1, next span mask 1 (see the op encoding)
    ops = np.array([200, -1, 203, -2], dtype=np.int64)
    conv_ops = np.array([0, 2, 4], dtype=np.int64)
    return [tokens, span_offsets, ops, conv_ops]


def test_render_assemble_small_by_hand():
    ids, mask, offsets = _C.render_assemble(*_assemble_args(), 3)
    assert ids.tolist() == [100, 5, 6, 101, 7]
    assert mask.tolist() == [0, 0, 0, 1, 1]
    assert offsets.tolist() == [0, 3, 5]


@pytest.mark.parametrize("position,bad,message", [
    (0, np.array([5, 6, 7], dtype=np.int64), "'tokens' must be a 1-D C-contiguous int32"),
    (1, np.array([0, 2, 3], dtype=np.int32), "'span_offsets' must be a 1-D C-contiguous int64"),
    (3, np.array([[0, 2, 4]], dtype=np.int64), "'conv_ops' must be a 1-D"),
    (2, np.array([200, 0, -1, 0, 203, 0, -2, 0], dtype=np.int64)[::2], "not C-contiguous"),
])
def test_render_assemble_rejects_wrong_arrays(position, bad, message):
    args = _assemble_args()
    args[position] = bad
    with pytest.raises(TypeError, match=message):
        _C.render_assemble(*args, 10)


@pytest.mark.parametrize("position,bad,message", [
    (2, np.array([200, -1, 203, -3], dtype=np.int64), "neither 2 \\* token id"),
    (2, np.array([200, -1, 203, 202], dtype=np.int64), "the ops use 1 text spans but 2 were given"),
    (3, np.array([0, 3, 2, 4], dtype=np.int64), "non-decreasing"),
    (3, np.array([0, 2, 3], dtype=np.int64), "indexed array has 4"),
    (1, np.array([0, 2, 4], dtype=np.int64), "indexed array has 3"),
])
def test_render_assemble_rejects_inconsistent_structure(position, bad, message):
    args = _assemble_args()
    args[position] = bad
    with pytest.raises(ValueError, match=message):
        _C.render_assemble(*args, 10)


def test_flatten_token_lists():
    tokens, offsets = _C.flatten_token_lists([[3, 1], [], [4, 1, 5]])
    assert tokens.dtype == np.int32 and tokens.tolist() == [3, 1, 4, 1, 5]
    assert offsets.tolist() == [0, 2, 2, 5]
    # Multi-digit ints, bools and numpy ints take the generic path and must give the same values.
    big = 2**31 - 1
    tokens, _ = _C.flatten_token_lists([[2**30 + 7, big, True, np.int64(12), 0]])
    assert tokens.tolist() == [2**30 + 7, big, 1, 12, 0]
    with pytest.raises(ValueError, match="holds token id 2147483648"):
        _C.flatten_token_lists([[1, 2**31]])
    with pytest.raises(ValueError, match="span 1 position 0 holds token id -2"):
        _C.flatten_token_lists([[1], [-2]])
    with pytest.raises(TypeError):
        _C.flatten_token_lists([[1], None])
    with pytest.raises(TypeError):
        _C.flatten_token_lists([["a"]])
