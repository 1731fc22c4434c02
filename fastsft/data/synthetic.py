"""Synthetic tasks generated on the fly: the data of the embedded default run (no download, any size, seeded).

- `arithmetic`: word problems of one to three steps, each step a calculator call (a `python` part the model
  writes, a `python_output` part the tool returns), then the final answer after '####' as in GSM8K.
- `letter-count`: "how many r in strawberry", answered by spelling the word out and counting the hits, checked
  with a python call, final answer after '####'.
- `spell`: "Spell the word: strawberry" -> "strawberry:s,t,r,a,w,b,e,r,r,y".

Example i of a split is a pure function of (task, split, seed, i). The split is by problem, not by index: a
problem (an arithmetic template with its numbers, or a word) belongs to the test split when a stable hash of
it falls in the test bucket, and each split only draws its own problems, so the held-out split measures
generalisation to problems never trained on.
"""

from __future__ import annotations

import random
import string
import zlib

from fastsft.data.base import Task
from fastsft.data.gsm8k import evaluate_final_answer
from fastsft.data.words import WORDS

SPLITS = ("train", "test")
TEST_BUCKETS = 10  # one problem in TEST_BUCKETS belongs to the test split


def split_of(key: str) -> str:
    """The split a problem belongs to, from a hash that is stable across runs and Python versions."""
    return "test" if zlib.crc32(key.encode()) % TEST_BUCKETS == 0 else "train"


class SyntheticTask(Task):
    """`size` examples of one split, generated from (name, split, seed, index)."""

    kind = "synthetic"
    eval_type = "generative"
    task_name = "synthetic"

    def __init__(self, size: int = 10_000, split: str = "train", seed: int = 0, **view):
        super().__init__(**view)
        if split not in SPLITS:
            raise ValueError(f"synthetic:{self.task_name}: split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"synthetic:{self.task_name}: size must be an int >= 1, got {size!r}")
        self.size, self.split, self.seed = size, split, seed
        self.name = f"synthetic:{self.task_name}@{split}"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        return self.draw(index)[1]

    def draw(self, index: int) -> tuple[str, dict]:
        """(problem key, conversation) of physical example `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name}: index {index} out of range for {self.size} examples")
        rng = random.Random(f"{self.task_name}:{self.split}:{self.seed}:{index}")
        while True:  # rejection sampling: draw until the problem belongs to this split
            key, conversation = self.generate(rng)
            if split_of(key) == self.split:
                return key, conversation

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        """(problem key, conversation) of one random problem; tasks on words key by the word, so a test word
        is held out of every spelling task's training split."""
        raise NotImplementedError


# --- arithmetic word problems ---------------------------------------------------------------------------------------

NAMES = (("Mia", "she"), ("Noah", "he"), ("Ava", "she"), ("Liam", "he"), ("Zoe", "she"), ("Omar", "he"),
         ("Lena", "she"), ("Ravi", "he"), ("Sofia", "she"), ("Kenji", "he"), ("Amara", "she"), ("Diego", "he"))
ITEMS = (("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("pencil", "pencils"),
         ("cookie", "cookies"), ("book", "books"), ("shell", "shells"), ("card", "cards"), ("egg", "eggs"),
         ("flower", "flowers"), ("coin", "coins"), ("balloon", "balloons"))


def _step(text: str, expr: str, value: int) -> list[dict]:
    return [{"type": "text", "text": text}, {"type": "python", "text": expr},
            {"type": "python_output", "text": str(value)}]


def _answer(parts: list[dict], closing: str, value: int) -> list[dict]:
    return parts + [{"type": "text", "text": f"{closing}\n#### {value}"}]


class Arithmetic(SyntheticTask):
    """Word problems of one to three calculator steps with integer answers."""

    task_name = "arithmetic"

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        (name, he), (other, _) = rng.sample(NAMES, 2)
        item, items = rng.choice(ITEMS)
        kind = rng.randrange(6)
        if kind == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            question = (f"{name} has {a} {items}. {he.capitalize()} gets {b} more. "
                        f"How many {items} does {name} have now?")
            parts = _answer(_step(f"{name} has {a} + {b} = ", f"{a}+{b}", a + b), f" {items}.", a + b)
            key = f"add:{a}:{b}"
        elif kind == 1:
            a = rng.randint(10, 99)
            b = rng.randint(1, a - 1)
            question = (f"{name} had {a} {items} and gave {b} of them to {other}. "
                        f"How many {items} does {name} have left?")
            parts = _answer(_step(f"{name} has {a} - {b} = ", f"{a}-{b}", a - b), f" {items} left.", a - b)
            key = f"sub:{a}:{b}"
        elif kind == 2:
            a, b = rng.randint(2, 12), rng.randint(2, 25)
            question = (f"{name} buys {a} boxes of {items}. Each box holds {b} {items}. "
                        f"How many {items} does {name} buy in total?")
            parts = _answer(_step(f"{name} buys {a} * {b} = ", f"{a}*{b}", a * b), f" {items}.", a * b)
            key = f"mul:{a}:{b}"
        elif kind == 3:
            a, b = rng.randint(2, 20), rng.randint(2, 9)
            question = (f"{name} shares {a * b} {items} equally among {b} friends. "
                        f"How many {items} does each friend get?")
            parts = _answer(_step(f"Each friend gets {a * b} / {b} = ", f"{a * b}//{b}", a), f" {items}.", a)
            key = f"div:{a}:{b}"
        elif kind == 4:
            a, b = rng.randint(2, 9), rng.randint(3, 12)
            c = rng.randint(1, a * b - 1)
            question = (f"{name} buys {a} packs of {items} with {b} {items} in each pack, then gives {c} {items} to "
                        f"{other}. How many {items} does {name} have left?")
            parts = _step(f"{name} buys {a} * {b} = ", f"{a}*{b}", a * b)
            parts += _step(f" {items}.\nAfter giving {c} away, {he} has {a * b} - {c} = ", f"{a * b}-{c}", a * b - c)
            parts = _answer(parts, f" {items} left.", a * b - c)
            key = f"mulsub:{a}:{b}:{c}"
        else:
            price, n = rng.randint(2, 15), rng.randint(2, 9)
            bill = next(x for x in (20, 50, 100, 200) if x > price * n)
            question = (f"One {item} costs ${price}. {name} buys {n} {items} and pays with a ${bill} bill. "
                        f"How much change does {he} get, in dollars?")
            parts = _step(f"The {items} cost {n} * {price} = ", f"{n}*{price}", n * price)
            parts += _step(f" dollars.\nThe change is {bill} - {n * price} = ", f"{bill}-{n * price}",
                           bill - n * price)
            parts = _answer(parts, " dollars.", bill - n * price)
            key = f"change:{price}:{n}:{bill}"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        return key, {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_final_answer(conversation, completion)


# --- spelling and letter counting ------------------------------------------------------------------------------------

ONSETS = ("b", "br", "c", "ch", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pl", "r", "s", "sh", "st",
          "t", "tr", "v", "w", "z")
VOWELS = ("a", "e", "i", "o", "u", "ee", "oo", "ai", "ou")
CODAS = ("", "", "n", "r", "s", "t", "l", "m", "ck", "ss", "rr", "ll")


def random_word(rng: random.Random) -> str:
    """A real word from the built-in list half of the time, else an invented pronounceable one (2-4 syllables)."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(2, 4)))


COUNT_QUESTIONS = (
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the {letter} in {word}.",
    "how many {letter} in {word}",
    "In the word {word}, how many {letter} are there?",
    "What is the number of {letter} in {word}?",
)


class LetterCount(SyntheticTask):
    """Count one letter in a word: spell it out, mark each hit with a running count, check with python."""

    task_name = "letter-count"

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        word = random_word(rng)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        quote = rng.choice(("", "'", '"'))
        template = rng.choice(COUNT_QUESTIONS)
        question = template.format(letter=f"{quote}{letter}{quote}", word=f"{quote}{word}{quote}")
        lines, count = [], 0
        for i, ch in enumerate(word, start=1):
            if ch == letter:
                count += 1
                lines.append(f"{i}:{ch} hit! count={count}")
            else:
                lines.append(f"{i}:{ch}")
        text = (f"Let me spell '{word}' out and count the '{letter}':\n" + "\n".join(lines)
                + f"\n\nThat gives {count}. Checking with python: ")
        parts = [{"type": "text", "text": text},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nThe letter '{letter}' appears {count} times.\n#### {count}"}]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        return word, {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_final_answer(conversation, completion)


class Spell(SyntheticTask):
    """Spell a word letter by letter: 'word:w,o,r,d'."""

    task_name = "spell"

    def generate(self, rng: random.Random) -> tuple[str, dict]:
        word = random_word(rng)
        messages = [{"role": "user", "content": f"Spell the word: {word}"},
                    {"role": "assistant", "content": f"{word}:{','.join(word)}"}]
        return word, {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        if not isinstance(completion, str):
            raise TypeError(f"{self.name}: completion must be a str, got {type(completion).__name__}")
        return completion.strip() == conversation["messages"][-1]["content"]


SYNTHETIC_TASKS = {cls.task_name: cls for cls in (Arithmetic, LetterCount, Spell)}

# The data of the embedded default run, in load_mixture spec form.
DEMO_MIXTURE = "synthetic:arithmetic,synthetic:letter-count,synthetic:spell"
