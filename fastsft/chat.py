"""The chat format: conversation validation, the token/mask rendering reference, and inspection helpers.

Why this file exists: the supervision mask decides what the model learns, so its rules live in one obviously
correct Python reference (render_conversation) that the fast C++ path (fastsft.packing.render_batch) is checked
against bit for bit. Both share normalize_conversation, so validation and the system-message merge happen once.

A conversation is a dict {"messages": [{"role": ..., "content": ...}, ...]}. Rendered layout and mask:

    <|bos|>                                                       0
    <|user_start|> user text <|user_end|>                         0
    <|assistant_start|>                                           0
        assistant text                                            1
        <|python_start|> code <|python_end|>                      1
        <|output_start|> tool output <|output_end|>               0
    <|assistant_end|>                                             1

A leading system message is merged into the first user message, joined by a blank line ("\\n\\n"). Roles then
alternate user/assistant starting with user. Assistant content is a str or a list of parts
{"type": "text" | "python" | "python_output", "text": str}. Message positions in errors ("message 3: ...") are
0-based indices into the conversation's "messages" list as given (before the system merge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# Assistant part type -> (opening special or None, closing special or None, mask of the whole part).
PART_LAYOUT = {
    "text": (None, None, 1),
    "python": ("<|python_start|>", "<|python_end|>", 1),
    "python_output": ("<|output_start|>", "<|output_end|>", 0),
}
PART_TYPES = tuple(PART_LAYOUT)


class ConversationError(ValueError):
    """A malformed conversation. .index: which conversation (position in its batch/dataset); .reason: what."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"conversation {index}: {reason}")
        self.index = index
        self.reason = reason

    def __reduce__(self):
        # Rebuild from (index, reason) so the error survives the trip back from a worker process.
        return (type(self), (self.index, self.reason))


def _check_assistant_content(content: object, index: int, position: int) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ConversationError(
            index, f"message {position}: assistant content must be a str or a list of parts, "
            f"got {type(content).__name__}"
        )
    for k, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ConversationError(index, f"message {position}: part {k} must be a dict, got {type(part).__name__}")
        kind = part.get("type")
        if kind not in PART_LAYOUT:
            raise ConversationError(
                index, f"message {position}: part {k} has unknown type {kind!r}; expected one of {PART_TYPES}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ConversationError(
                index, f"message {position}: part {k} ({kind}) text must be a str, got {type(text).__name__}"
            )


def normalize_conversation(conversation: object, index: int = 0) -> list[dict]:
    """Validate a conversation and merge a leading system message into the first user message.

    Returns the list of messages, alternating user/assistant and starting with user. Only the merged user message is
    a new dict; every other message is the caller's own object (do not mutate the result). When there is no system
    message the caller's list itself is returned. `index` only labels errors. Raises ConversationError.
    """
    if not isinstance(conversation, Mapping):
        raise ConversationError(index, f"must be a dict with 'messages', got {type(conversation).__name__}")
    if "messages" not in conversation:
        raise ConversationError(index, f"has no 'messages' key (keys: {sorted(map(str, conversation))})")
    messages = conversation["messages"]
    if not isinstance(messages, list):
        raise ConversationError(index, f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ConversationError(index, "'messages' is empty")

    first = messages[0]
    offset = 1 if isinstance(first, Mapping) and first.get("role") == "system" else 0
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConversationError(index, f"message {position}: must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ConversationError(
                index, f"message {position}: unknown role {role!r}; expected 'system', 'user' or 'assistant'"
            )
        if "content" not in message:
            raise ConversationError(index, f"message {position}: has no 'content'")
        content = message["content"]
        if role == "system":
            if position != 0:
                raise ConversationError(index, f"message {position}: a system message may only come first")
            if not isinstance(content, str):
                raise ConversationError(
                    index, f"message {position}: system content must be a str, got {type(content).__name__}"
                )
            continue
        expected = "user" if (position - offset) % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(
                index, f"message {position}: expected role {expected!r} (roles alternate user/assistant "
                f"starting with user), got {role!r}"
            )
        if role == "user":
            if not isinstance(content, str):
                raise ConversationError(
                    index, f"message {position}: user content must be a str, got {type(content).__name__}"
                )
        else:
            _check_assistant_content(content, index, position)

    if not offset:
        return messages
    if len(messages) < 2:
        raise ConversationError(index, "message 0: a system message must be followed by a user message")
    merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [merged, *messages[2:]]


def _render_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and mask of normalized messages, untruncated. The rules are spelled out one span at a time."""
    special = tokenizer.encode_special
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], supervised: int) -> None:
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    add([tokenizer.bos_id], 0)
    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            add([special("<|user_start|>")], 0)
            add(tokenizer.encode(content), 0)
            add([special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            opening, closing, supervised = PART_LAYOUT[part["type"]]
            if opening is not None:
                add([special(opening)], supervised)
            add(tokenizer.encode(part["text"]), supervised)
            if closing is not None:
                add([special(closing)], supervised)
        add([special("<|assistant_end|>")], 1)
    return ids, mask


def render_conversation(
    tokenizer, conversation: object, max_tokens: int = 2048, index: int = 0
) -> tuple[list[int], list[int]]:
    """The Python reference: conversation -> (ids, mask), both lists of length <= max_tokens.

    mask[t] = 1 where token t is a target the model is trained to predict. Longer conversations are cut to their
    first max_tokens tokens (callers count truncations, e.g. with supervision_stats). `index` only labels errors.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    ids, mask = _render_messages(tokenizer, normalize_conversation(conversation, index))
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer, conversation: object, index: int = 0) -> list[int]:
    """Prompt ids for generation/eval: the conversation without its final assistant reply, then <|assistant_start|>.

    If the last message is from the assistant it is dropped (the usual eval case: the reference answer is there).
    A conversation ending with a user message is prompted as is. Never truncated.
    """
    messages = normalize_conversation(conversation, index)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = _render_messages(tokenizer, messages)
    ids.append(tokenizer.encode_special("<|assistant_start|>"))
    return ids


_GREEN, _RED, _RESET = "\033[92m", "\033[91m", "\033[0m"


def visualize_tokenization(tokenizer, ids, mask) -> str:
    """Each token decoded on its own, green if supervised (mask 1) and red if not, joined by '|'."""
    ids, mask = list(ids), list(mask)
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length: {len(ids)} vs {len(mask)}")
    pieces = []
    for token_id, supervised in zip(ids, mask):
        color = _GREEN if supervised else _RED
        pieces.append(f"{color}{tokenizer.decode([int(token_id)])}{_RESET}")
    return "|".join(pieces)


def supervision_stats(rendered: Iterable, seq_len: int | None = None) -> dict:
    """Summary of rendered conversations, an iterable of (ids, mask) pairs (lists or numpy arrays).

    Keys: conversations, tokens, supervised_tokens, supervised_ratio, and the length distribution length_mean,
    length_p50, length_p90, length_p99 (numpy's linear-interpolation percentiles), length_max. With seq_len also:
    truncated (conversations longer than seq_len), truncated_tokens and truncated_supervised (tokens past seq_len,
    which would be cut). supervised_tokens is the number of mask-1 tokens, i.e. the number of supervised targets
    (the first token of a conversation, BOS, is never supervised).
    """
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
    lengths, supervised, cut_tokens, cut_supervised = [], [], 0, 0
    for k, (ids, mask) in enumerate(rendered):
        mask = np.asarray(mask)
        if len(ids) != len(mask):
            raise ValueError(f"rendered item {k}: ids and mask differ in length ({len(ids)} vs {len(mask)})")
        lengths.append(len(ids))
        supervised.append(int(np.count_nonzero(mask)))
        if seq_len is not None and len(ids) > seq_len:
            cut_tokens += len(ids) - seq_len
            cut_supervised += int(np.count_nonzero(mask[seq_len:]))
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    tokens = int(lengths_arr.sum())
    stats = {
        "conversations": len(lengths),
        "tokens": tokens,
        "supervised_tokens": int(sum(supervised)),
        "supervised_ratio": sum(supervised) / tokens if tokens else 0.0,
    }
    if len(lengths):
        p50, p90, p99 = np.percentile(lengths_arr, [50, 90, 99])
        stats.update(
            length_mean=float(lengths_arr.mean()),
            length_p50=float(p50),
            length_p90=float(p90),
            length_p99=float(p99),
            length_max=int(lengths_arr.max()),
        )
    else:
        stats.update(length_mean=0.0, length_p50=0.0, length_p90=0.0, length_p99=0.0, length_max=0)
    if seq_len is not None:
        stats.update(
            seq_len=seq_len,
            truncated=int((lengths_arr > seq_len).sum()),
            truncated_tokens=cut_tokens,
            truncated_supervised=cut_supervised,
        )
    return stats
