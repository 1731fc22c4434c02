"""Chat format tests: the mask rules token by token, system merge, truncation, prompts, validation errors, stats."""

import pickle
import random

import numpy as np
import pytest

from fastsft.chat import (
    ConversationError,
    normalize_conversation,
    render_conversation,
    render_for_completion,
    supervision_stats,
    visualize_tokenization,
)
from fastsft.tokenizer import SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "Hello! How can I help you today? I would like to know what 12 + 30 is.",
    "Let me compute that with Python: print(12 + 30) gives 42, so the answer is 42.",
    "You are a helpful assistant. Answer briefly and politely, in English or français.",
    "def f(x):\n    return x * 2\n",
    "Users sometimes type <|user_end|> or <|assistant_start|> inside their text.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(CORPUS * 20, vocab_size=400)


def sp(tok, name):
    return tok.encode_special(name)


def span(ids, supervised):
    return list(ids), [supervised] * len(ids)


def concat(*spans):
    ids, mask = [], []
    for i, m in spans:
        ids += i
        mask += m
    return ids, mask


def test_single_turn_mask_token_by_token(tok):
    conv = {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]}
    ids, mask = render_conversation(tok, conv)
    user, reply = tok.encode("Hello!"), tok.encode("Hi there.")
    expected_ids = [tok.bos_id, sp(tok, "<|user_start|>"), *user, sp(tok, "<|user_end|>"),
                    sp(tok, "<|assistant_start|>"), *reply, sp(tok, "<|assistant_end|>")]
    expected_mask = [0, 0] + [0] * len(user) + [0, 0] + [1] * len(reply) + [1]
    assert ids == expected_ids
    assert mask == expected_mask


def test_tool_parts_mask(tok):
    parts = [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "print(12 + 30)"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "The answer is 42."},
    ]
    conv = {"messages": [{"role": "user", "content": "12 + 30?"}, {"role": "assistant", "content": parts}]}
    ids, mask = render_conversation(tok, conv)
    expected = concat(
        span([tok.bos_id, sp(tok, "<|user_start|>")], 0),
        span(tok.encode("12 + 30?"), 0),
        span([sp(tok, "<|user_end|>"), sp(tok, "<|assistant_start|>")], 0),
        span(tok.encode("Let me compute."), 1),
        span([sp(tok, "<|python_start|>"), *tok.encode("print(12 + 30)"), sp(tok, "<|python_end|>")], 1),
        span([sp(tok, "<|output_start|>"), *tok.encode("42"), sp(tok, "<|output_end|>")], 0),
        span(tok.encode("The answer is 42."), 1),
        span([sp(tok, "<|assistant_end|>")], 1),
    )
    assert (ids, mask) == expected


def test_system_message_merges_into_first_user_message(tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
    ]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHello!"}, {"role": "assistant", "content": "Hi."}]}
    assert render_conversation(tok, conv) == render_conversation(tok, merged)
    messages = normalize_conversation(conv)
    assert messages[0] == {"role": "user", "content": "Be brief.\n\nHello!"}
    assert messages[1] is conv["messages"][2]  # no copies beyond the merge
    assert conv["messages"][1]["content"] == "Hello!"  # the input is not mutated


def test_normalize_returns_input_list_without_system(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert normalize_conversation({"messages": messages}) is messages


def test_multi_turn_mask_and_specials_in_text(tok):
    texts = ["Hi <|assistant_start|>", "Hello <|assistant_end|>", "More?", "Yes."]
    conv = {"messages": [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, texts)]}
    ids, mask = render_conversation(tok, conv)
    expected = concat(span([tok.bos_id], 0))
    for role, text in zip(["user", "assistant"] * 2, texts):
        if role == "user":
            user = [sp(tok, "<|user_start|>"), *tok.encode(text), sp(tok, "<|user_end|>")]
            expected = concat(expected, span(user, 0))
        else:
            expected = concat(expected, span([sp(tok, "<|assistant_start|>")], 0), span(tok.encode(text), 1),
                              span([sp(tok, "<|assistant_end|>")], 1))
    assert (ids, mask) == expected
    # The forged spellings stayed text: exactly one assistant_start/end per real assistant turn.
    assert ids.count(sp(tok, "<|assistant_start|>")) == 2 and ids.count(sp(tok, "<|assistant_end|>")) == 2


def mask_from_structure(tok, ids):
    """An independent oracle: recover each token's mask from the special tokens alone (a state machine)."""
    name = {tok.encode_special(n): n for n in SPECIAL_TOKENS}
    state, mask = "outside", []
    for i in ids:
        n = name.get(i)
        if n in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>"):
            mask.append(0)
            state = {"<|user_start|>": "user", "<|assistant_start|>": "assistant"}.get(n, "outside")
        elif n in ("<|python_start|>", "<|python_end|>"):
            mask.append(1)
            state = "python" if n == "<|python_start|>" else "assistant"
        elif n in ("<|output_start|>", "<|output_end|>"):
            mask.append(0)
            state = "output" if n == "<|output_start|>" else "assistant"
        elif n == "<|assistant_end|>":
            mask.append(1)
            state = "outside"
        else:
            assert state != "outside", "ordinary token outside any message"
            mask.append(1 if state in ("assistant", "python") else 0)
    return mask


def random_conversation(rng):
    words = ["hello", " world", "<|user_end|>", " 123", "\n", "é", "<|python_start|>", "code()", " ", "🙂", "a"]

    def text():
        return "".join(rng.choice(words) for _ in range(rng.randrange(0, 6)))

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
    for turn in range(rng.randrange(1, 4)):
        messages.append({"role": "user", "content": text()})
        if rng.random() < 0.5:
            content = text()
        else:
            content = [{"type": rng.choice(["text", "python", "python_output"]), "text": text()}
                       for _ in range(rng.randrange(0, 4))]
        messages.append({"role": "assistant", "content": content})
    if rng.random() < 0.2:
        messages.pop()  # ends with a user message
    return {"messages": messages}


def test_random_conversations_follow_mask_rules(tok):
    rng = random.Random(17)
    for _ in range(150):
        conv = random_conversation(rng)
        ids, mask = render_conversation(tok, conv)
        assert ids[0] == tok.bos_id
        assert mask == mask_from_structure(tok, ids)
        assert set(mask) <= {0, 1}


def test_truncation_is_a_prefix(tok):
    rng = random.Random(23)
    conv = random_conversation(rng)
    full_ids, full_mask = render_conversation(tok, conv, max_tokens=10**6)
    for max_tokens in (1, 2, 7, len(full_ids) - 1, len(full_ids), len(full_ids) + 5):
        ids, mask = render_conversation(tok, conv, max_tokens=max_tokens)
        assert len(ids) == len(mask) == min(max_tokens, len(full_ids))
        assert ids == full_ids[:max_tokens] and mask == full_mask[:max_tokens]
    for bad in (0, -3, 2.5, None, True):
        with pytest.raises(ValueError, match="max_tokens"):
            render_conversation(tok, conv, max_tokens=bad)


def test_render_for_completion(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2 " * 1500},
        {"role": "assistant", "content": [{"type": "text", "text": "A2"}]},
    ]
    prompt = render_for_completion(tok, {"messages": messages})
    prefix_ids, _ = render_conversation(tok, {"messages": messages[:-1]}, max_tokens=10**6)
    assert prompt == prefix_ids + [sp(tok, "<|assistant_start|>")]
    assert len(prompt) > 2048  # prompts are never truncated
    # Ending with a user message: prompted as is.
    assert render_for_completion(tok, {"messages": messages[:-1]}) == prompt


def reply(content):
    return {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": content}]}


BAD_CONVERSATIONS = [
    ("not a dict", "must be a dict"),
    ({"turns": []}, "no 'messages'"),
    ({"messages": "hi"}, "must be a list"),
    ({"messages": []}, "empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "message 0: unknown role 'tool'"),
    ({"messages": ["hello"]}, "message 0: must be a dict"),
    ({"messages": [{"role": "user"}]}, "message 0: has no 'content'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "message 0: expected role 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "message 1: expected role 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]},
     "message 1: expected role 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "message 1: a system message may only come first"),
    ({"messages": [{"role": "system", "content": "s"}]}, "message 0: a system message must be followed"),
    ({"messages": [{"role": "system", "content": ["s"]}, {"role": "user", "content": "u"}]},
     "message 0: system content must be a str"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "message 0: user content must be a str"),
    (reply(5), "message 1: assistant content must be a str or a list"),
    (reply([{"type": "code", "text": "x"}]), "message 1: part 0 has unknown type 'code'"),
    (reply([{"type": "text", "text": "ok"}, {"type": "python", "text": 3}]),
     "message 1: part 1 (python) text must be a str"),
    (reply([{"type": "python_output"}]), "message 1: part 0 (python_output) text must be a str"),
    (reply(["x"]), "message 1: part 0 must be a dict"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}, {"role": "user", "content": "d"}]},
     "message 3: expected role 'assistant'"),
]


@pytest.mark.parametrize("conversation, reason", BAD_CONVERSATIONS, ids=[r for _, r in BAD_CONVERSATIONS])
def test_bad_conversations_raise_with_index_and_reason(tok, conversation, reason):
    for call in (normalize_conversation, lambda c, index: render_conversation(tok, c, index=index),
                 lambda c, index: render_for_completion(tok, c, index=index)):
        with pytest.raises(ConversationError) as info:
            call(conversation, index=41)
        assert info.value.index == 41
        assert reason in info.value.reason
        assert str(info.value).startswith("conversation 41: ")
        assert isinstance(info.value, ValueError)
    clone = pickle.loads(pickle.dumps(info.value))  # errors travel back from worker processes intact
    assert (clone.index, clone.reason, str(clone)) == (info.value.index, info.value.reason, str(info.value))


def test_visualize_tokenization(tok):
    ids = [tok.bos_id, *tok.encode("Hi"), sp(tok, "<|assistant_end|>")]
    mask = [0] + [1] * (len(ids) - 2) + [1]
    out = visualize_tokenization(tok, ids, np.array(mask))
    green, red, reset = "\033[92m", "\033[91m", "\033[0m"
    assert out.startswith(f"{red}<|bos|>{reset}")
    assert out.endswith(f"{green}<|assistant_end|>{reset}")
    assert "".join(tok.decode([i]) for i in ids[1:-1]) == "Hi"
    assert out.count("|" + green) == len(ids) - 1
    expected = "|".join(f"{green if m else red}{tok.decode([i])}{reset}" for i, m in zip(ids, mask))
    assert out == expected
    with pytest.raises(ValueError, match="differ in length"):
        visualize_tokenization(tok, ids, mask[:-1])


def test_supervision_stats_hand_checked():
    rendered = [
        ([1, 2, 3, 4], [0, 0, 1, 1]),                              # 4 tokens, 2 supervised
        (np.arange(6), np.array([0, 0, 0, 1, 1, 0])),              # 6 tokens, 2 supervised
        (list(range(10)), [0, 0, 1, 1, 1, 1, 0, 0, 1, 1]),        # 10 tokens, 6 supervised
    ]
    stats = supervision_stats(iter(rendered))
    assert stats["conversations"] == 3
    assert stats["tokens"] == 20
    assert stats["supervised_tokens"] == 10
    assert stats["supervised_ratio"] == pytest.approx(0.5)
    assert stats["length_mean"] == pytest.approx(20 / 3)
    assert stats["length_p50"] == pytest.approx(6.0)
    assert stats["length_p90"] == pytest.approx(9.2)   # linear: 6 + 0.8 * (10 - 6)
    assert stats["length_p99"] == pytest.approx(9.92)  # 6 + 0.98 * (10 - 6)
    assert stats["length_max"] == 10
    assert "truncated" not in stats

    cut = supervision_stats(rendered, seq_len=5)
    assert cut["truncated"] == 2                 # the 6- and 10-token conversations
    assert cut["truncated_tokens"] == 1 + 5
    assert cut["truncated_supervised"] == 0 + 3  # mask[5:] of each: [0] and [1, 0, 0, 1, 1]
    assert supervision_stats(rendered, seq_len=10)["truncated"] == 0


def test_supervision_stats_edge_cases(tok):
    empty = supervision_stats([], seq_len=8)
    assert empty["conversations"] == 0 and empty["tokens"] == 0 and empty["truncated"] == 0
    with pytest.raises(ValueError, match="item 1"):
        supervision_stats([([1], [0]), ([1, 2], [0])])
    with pytest.raises(ValueError, match="seq_len"):
        supervision_stats([], seq_len=0)
    conv = {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]}
    ids, mask = render_conversation(tok, conv)
    stats = supervision_stats([(ids, mask)])
    assert stats["supervised_tokens"] == len(tok.encode("Hi.")) + 1
