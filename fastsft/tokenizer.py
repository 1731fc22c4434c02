"""Byte-level BPE tokenizer for chat SFT, on Hugging Face `tokenizers` (Rust, multi-threaded batch encoding).

Why a wrapper: the chat format needs nine special tokens with fixed ids, and ordinary text must never be able to
produce one of them (a user who writes "<|user_end|>" in a message must not forge conversation structure).

Token ids. The ordinary vocabulary takes ids 0 .. base_vocab-1 (for GPT-2: 50257 tokens, `<|endoftext|>` = 50256
is an ordinary token here). The special tokens follow, in this fixed order:

    base_vocab + 0  <|bos|>              base_vocab + 5  <|python_start|>
    base_vocab + 1  <|user_start|>       base_vocab + 6  <|python_end|>
    base_vocab + 2  <|user_end|>         base_vocab + 7  <|output_start|>
    base_vocab + 3  <|assistant_start|>  base_vocab + 8  <|output_end|>
    base_vocab + 4  <|assistant_end|>

so `vocab_size == base_vocab + 9` (GPT-2: specials 50257..50265, vocab_size 50266).

How specials stay out of encoded text: they are registered in the HF backend as special added tokens (so a saved
tokenizer.json shows them to every other tool and decode prints them), but the backend runs with
`encode_special_tokens = True`, which makes `encode` treat their spelling as ordinary text. The only way to get a
special id is `encode_special(name)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)

# GPT-4's split pattern with digit groups of at most two (as nanochat): fewer distinct number tokens spent on a
# small vocabulary. Possessive quantifiers are supported by the Oniguruma engine inside `tokenizers`.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _token_str(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _split_pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Regex split (each match its own piece) then the byte-level map, without GPT-2's own regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _bpe_merge(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Tiktoken's encoding rule restricted to ranks below max_rank: merge the adjacent pair of lowest rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_i, best_rank = i, rank
        if best_i < 0:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


class TextEncodingError(ValueError):
    """A text the tokenizer cannot encode: not valid Unicode (a lone surrogate such as "\\ud800", which JSON can
    spell but UTF-8 cannot). `item` is its position in the batch, `reason` says what and where."""

    def __init__(self, item: int, reason: str):
        super().__init__(f"text {item}: {reason}")
        self.item, self.reason = item, reason


def _check_encodable(texts: Sequence[str]) -> None:
    """Raise TextEncodingError for the first text that is not valid Unicode (called after the backend refused)."""
    for k, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TextEncodingError(k, f"not valid Unicode (lone surrogate U+{ord(text[e.start]):04X} at character "
                                       f"{e.start})") from None


class Tokenizer:
    """Byte-level BPE with the nine chat special tokens appended after the ordinary vocabulary."""

    def __init__(self, backend: HFTokenizer):
        """Wrap an HF byte-level BPE tokenizer; adds the nine specials after its model vocabulary if it lacks them.

        Other added tokens are refused, except special ones already inside the model vocabulary (GPT-2's
        <|endoftext|> in its tokenizer.json), which like ours are then encoded as plain text.
        """
        self._hf = backend
        self._base_vocab = backend.get_vocab_size(with_added_tokens=False)
        added_tokens = backend.get_added_tokens_decoder()
        foreign = [
            f"{t.content!r} (id {i})"
            for i, t in added_tokens.items()
            if t.content not in SPECIAL_TOKENS and (i >= self._base_vocab or not t.special)
        ]
        if foreign:
            raise ValueError(f"tokenizer has added tokens besides the chat specials: {', '.join(foreign)}")
        added = {t.content: i for i, t in added_tokens.items() if t.content in SPECIAL_TOKENS}
        missing = [name for name in SPECIAL_TOKENS if name not in added]
        if missing and len(missing) != len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer has only some of the special tokens; missing {missing}")
        if missing:
            backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
            added = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.content in SPECIAL_TOKENS}
        self._special_ids = {name: added[name] for name in SPECIAL_TOKENS}
        expected = {name: self._base_vocab + k for k, name in enumerate(SPECIAL_TOKENS)}
        if self._special_ids != expected:
            raise ValueError(
                f"special token ids {self._special_ids} are not the fixed layout {expected} "
                f"(base vocabulary {self._base_vocab}); was the tokenizer.json edited?"
            )
        # The guard against forged structure: special spellings in text are split like any other text.
        backend.encode_special_tokens = True
        self._id_to_special = {i: name for name, i in self._special_ids.items()}
        self.vocab_size = self._base_vocab + len(SPECIAL_TOKENS)
        self.bos_id = self._special_ids["<|bos|>"]

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> Tokenizer:
        """Train byte-level BPE on texts. vocab_size COUNTS the nine specials (as nanochat does).

        The ordinary vocabulary is the 256 bytes plus learned merges, so vocab_size must be at least 256 + 9. A small
        corpus may yield fewer merges than asked; the specials then follow the ordinary tokens actually learned.
        """
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
        backend = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        backend.normalizer = None
        backend.pre_tokenizer = _split_pre_tokenizer(pattern)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = None
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS),
            show_progress=False,
            min_frequency=0,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        try:
            backend.train_from_iterator(texts, trainer)
        except UnicodeEncodeError as e:
            raise ValueError(f"train_from_iterator: a text is not valid Unicode (lone surrogate "
                             f"U+{ord(e.object[e.start]):04X} at character {e.start})") from None
        return cls(backend)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.json written by save() (or any byte-level BPE file with our specials, or none)."""
        try:
            backend = HFTokenizer.from_file(os.fspath(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception for any unreadable file
            raise ValueError(f"{path}: not a tokenizer.json that the `tokenizers` library can read ({e})") from None
        return cls(backend)

    @classmethod
    def from_gpt2(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> Tokenizer:
        """GPT-2's vocab.json + merges.txt with GPT-2's own ByteLevel pre-tokenizer; specials at 50257..50265."""
        backend = HFTokenizer(models.BPE.from_file(os.fspath(vocab_json), os.fspath(merges_txt)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        return cls(backend)

    @classmethod
    def from_mergeable_ranks(cls, ranks: Mapping[bytes, int], pattern: str = SPLIT_PATTERN) -> Tokenizer:
        """Build the BPE of a tiktoken-style {token bytes: rank} table (e.g. nanochat's); ids equal ranks.

        Merges are recovered by the standard procedure: for each multi-byte token in rank order, run the rank-based
        BPE on its bytes using only lower ranks; the two pieces left are the merge that made it. Applying those
        merges by priority equals tiktoken's rule of merging the adjacent pair whose concatenation ranks lowest.
        """
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly 0..len(ranks)-1, each once")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"mergeable ranks lack {len(missing)} single bytes (e.g. {missing[:5]}); need all 256")
        vocab = {_token_str(token): rank for token, rank in ranks.items()}
        merges = []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) == 1:
                continue
            parts = _bpe_merge(ranks, token, max_rank=rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
            merges.append((_token_str(parts[0]), _token_str(parts[1])))
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _split_pre_tokenizer(pattern)
        backend.decoder = decoders.ByteLevel()
        return cls(backend)

    def save(self, path: str | os.PathLike) -> None:
        """Write a standard tokenizer.json (specials listed as special added tokens; readable by HF tools)."""
        self._hf.save(os.fspath(path))

    # ---- encoding -----------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Never yields a special id, whatever the text spells."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except (UnicodeEncodeError, TypeError):
            _check_encodable([text])
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts in one call into the Rust batch encoder (parallel threads); same ids as encode on each."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of str, got a single str")
        if not isinstance(texts, list):
            texts = list(texts)
        # The check is ~30 ns a text; without it a tuple element would silently be encoded as a sentence pair.
        if not all(isinstance(t, str) for t in texts):
            k = next(k for k, t in enumerate(texts) if not isinstance(t, str))
            raise TypeError(f"encode_batch: item {k} is {type(texts[k]).__name__}, expected str")
        try:
            encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        except (UnicodeEncodeError, TypeError):  # the backend's errors for a lone surrogate; valid text pays nothing
            _check_encodable(texts)
            raise
        return [e.ids for e in encodings]

    def encode_special(self, name: str) -> int:
        """The id of one of SPECIAL_TOKENS; KeyError naming the valid names otherwise."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; valid names: {', '.join(SPECIAL_TOKENS)}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; specials print as their names. Raises ValueError on an id outside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._hf.decode(ids, skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id (byte-level characters for ordinary tokens, the name for specials)."""
        token = self._hf.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return token

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._id_to_special

    @property
    def special_ids(self) -> dict[str, int]:
        """Name -> id of the nine specials (a copy)."""
        return dict(self._special_ids)

    @property
    def base_vocab_size(self) -> int:
        """Number of ordinary tokens; the specials start at this id."""
        return self._base_vocab

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Tiktoken-style {token bytes: id} of the ordinary vocabulary (for export and round-trip checks)."""
        vocab = self._hf.get_vocab(with_added_tokens=False)
        try:
            return {bytes(_CHAR_TO_BYTE[c] for c in token): i for token, i in vocab.items()}
        except KeyError as e:
            raise ValueError(f"vocabulary entry uses a character {e} outside the byte-level alphabet") from None

    def __getstate__(self) -> dict:
        # HF's own pickling drops `encode_special_tokens`, which would re-open the forged-structure hole in a
        # DataLoader worker; rebuilding through __init__ sets it again.
        return {"tokenizer_json": self._hf.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(HFTokenizer.from_str(state["tokenizer_json"]))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(base_vocab={self._base_vocab}, vocab_size={self.vocab_size}, bos_id={self.bos_id})"
