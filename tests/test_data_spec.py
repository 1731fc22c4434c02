"""Spec strings: parsing, load_task, load_mixture with repeats, and their errors."""

import json

import pytest

from fastsft.data import (ARC, GSM8K, MMLU, ConversationFile, DataError, HumanEval, LetterCount, SmolTalk, Spell,
                          TaskMixture, load_mixture, load_task, parse_spec)


def test_parse_spec():
    assert parse_spec("gsm8k") == ("gsm8k", "", {}, 1)
    assert parse_spec(" gsm8k:data/x.jsonl?stop=10&step=2*3 ") == ("gsm8k", "data/x.jsonl", {"stop": 10, "step": 2}, 3)
    assert parse_spec("mmlu:cais/mmlu@dev?subset=all") == ("mmlu", "cais/mmlu@dev", {"subset": "all"}, 1)
    assert parse_spec("synthetic:spell@test?size=5&seed=3") == ("synthetic", "spell@test", {"size": 5, "seed": 3}, 1)


@pytest.mark.parametrize("spec,match", [
    ("", "empty task spec"),
    ("csv:rows.csv", "unknown kind 'csv'"),
    ("gsm8k:x.jsonl?stop=ten", "option stop must be an integer"),
    ("gsm8k:x.jsonl?limit=3", "bad option 'limit=3'"),
    ("gsm8k:x.jsonl?stop", "bad option 'stop'"),
    ("synthetic:poetry", "unknown synthetic task 'poetry'"),
    ("jsonl", "a file path"),
    ("gsm8k:x.jsonl*2", "only make sense in a mixture"),
])
def test_spec_errors(spec, match):
    with pytest.raises(DataError, match=match):
        load_task(spec)


def test_option_the_task_does_not_take(fixture_data):
    with pytest.raises(DataError, match="option not taken by a gsm8k task"):
        load_task(f"gsm8k:{fixture_data / 'gsm8k_train.jsonl'}?size=3")


def test_kinds_build_the_right_tasks(fixture_data, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    cases = {
        f"gsm8k:{fixture_data / 'gsm8k_train.jsonl'}?stop=5": (GSM8K, 5),
        f"arc-easy:{fixture_data / 'arc_easy_test.jsonl'}?start=30": (ARC, 0),
        f"mmlu:{fixture_data / 'mmlu_dev.jsonl'}?step=12": (MMLU, 3),
        f"humaneval:{fixture_data / 'humaneval.jsonl.gz'}": (HumanEval, 13),
        f"smoltalk:{chat}": (SmolTalk, 1),
        f"jsonl:{chat}": (ConversationFile, 1),
        "synthetic:spell?size=9": (Spell, 9),
        "synthetic:letter-count@test?size=4&seed=2": (LetterCount, 4),
    }
    for spec, (cls, size) in cases.items():
        task = load_task(spec)
        assert type(task) is cls and len(task) == size, spec
    assert load_task("synthetic:letter-count@test?size=4&seed=2").split == "test"
    assert load_task("synthetic:spell", size=3).size == 3  # keywords override the spec


def test_load_mixture_repeats_share_one_task(fixture_data):
    gsm = fixture_data / "gsm8k_train.jsonl"
    mix = load_mixture(f"gsm8k:{gsm}?stop=40*3, synthetic:spell?size=25,synthetic:arithmetic?size=10*2", seed=5)
    assert isinstance(mix, TaskMixture) and len(mix) == 40 * 3 + 25 + 10 * 2
    assert [(type(t).__name__, len(t), r) for t, r in mix.repeats()] == [("GSM8K", 40, 3), ("Spell", 25, 1),
                                                                       ("Arithmetic", 10, 2)]
    # A spec listed twice (also through a list) is loaded once and oversampled.
    twice = load_mixture([f"gsm8k:{gsm}?stop=40", f"gsm8k:{gsm}?stop=40,synthetic:spell?size=3"])
    assert [r for _, r in twice.repeats()] == [2, 1]
    same = load_mixture(f"gsm8k:{gsm}?stop=40*3, synthetic:spell?size=25,synthetic:arithmetic?size=10*2", seed=5)
    assert [same[i] for i in range(len(same))] == [mix[i] for i in range(len(mix))]


def test_load_mixture_errors():
    with pytest.raises(DataError, match="no task specs"):
        load_mixture(" , ")
    with pytest.raises(DataError, match="unknown kind"):
        load_mixture("synthetic:spell,nope:x")
