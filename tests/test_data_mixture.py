"""Task views (slicing), TaskMixture (deterministic shuffle, oversampling) and TaskSequence."""

from collections import Counter

import pytest

from fastsft.data import DataError, Task, TaskMixture, TaskSequence


class Numbers(Task):
    """Example i is a one-turn conversation naming `tag` and i: easy to trace through views and mixtures."""

    def __init__(self, tag, size, **view):
        super().__init__(**view)
        self.tag, self.size, self.name = tag, size, f"numbers:{tag}"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        assert 0 <= index < self.size
        return {"messages": [{"role": "user", "content": f"{self.tag}"}, {"role": "assistant", "content": str(index)}],
                "tag": self.tag, "i": index}


def ids(task):
    return [(c["tag"], c["i"]) for c in task]


@pytest.mark.parametrize("start,stop,step", [(0, None, 1), (3, 17, 1), (2, 20, 3), (5, 6, 4), (7, 7, 1), (0, 37, 5)])
def test_slicing_matches_python_slices(start, stop, step):
    task = Numbers("a", 37, start=start, stop=stop, step=step)
    expected = list(range(37))[start:stop:step]
    assert len(task) == len(expected)
    assert [c["i"] for c in task] == expected
    if expected:
        assert task[-1]["i"] == expected[-1]
    with pytest.raises(IndexError):
        task[len(expected)]


def test_slice_view_of_a_view():
    task = Numbers("a", 50, start=4, step=2)  # 4, 6, ..., 48
    view = task[3:20:4]
    assert [c["i"] for c in view] == list(range(4, 50, 2))[3:20:4]
    assert [c["i"] for c in view[1:]] == list(range(4, 50, 2))[3:20:4][1:]


def test_stop_past_the_end_is_capped_with_a_warning():
    task = Numbers("a", 10, stop=25)
    with pytest.warns(UserWarning, match="stop=25 exceeds the 10 examples"):
        assert len(task) == 10


@pytest.mark.parametrize("kw,match", [({"start": -1}, "start"), ({"start": 5, "stop": 2}, "stop"),
                                      ({"step": 0}, "step"), ({"step": 1.5}, "step")])
def test_bad_view_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Numbers("a", 10, **kw)


def test_index_type_is_checked():
    with pytest.raises(TypeError, match="index must be an int"):
        Numbers("a", 3)["0"]


def test_mixture_covers_every_pair_once_and_is_deterministic():
    a, b, c = Numbers("a", 23), Numbers("b", 7), Numbers("c", 11)
    mix = TaskMixture([a, b, c], seed=7)
    order = ids(mix)
    assert len(mix) == 41
    assert sorted(order) == sorted(ids(a) + ids(b) + ids(c))
    assert ids(TaskMixture([a, b, c], seed=7)) == order  # same seed, same order
    assert ids(TaskMixture([a, b, c], seed=8)) != order  # another seed, another order
    assert order != ids(TaskSequence([a, b, c]))  # actually shuffled
    # Mixed throughout: every task shows up in the first half.
    assert {t for t, _ in order[:20]} == {"a", "b", "c"}


def test_mixture_oversampling_counts():
    a, b = Numbers("a", 13), Numbers("b", 5)
    mix = TaskMixture([a, b, a, a], seed=1)
    counts = Counter(ids(mix))
    assert len(mix) == 3 * 13 + 5
    assert all(counts[("a", i)] == 3 for i in range(13)) and all(counts[("b", i)] == 1 for i in range(5))
    assert [(t.name, r) for t, r in mix.repeats()] == [("numbers:a", 3), ("numbers:b", 1)]
    assert [t.name for t in mix.leaves()] == ["numbers:a", "numbers:b"]


def test_mixture_source_of_and_view():
    a, b = Numbers("a", 9), Numbers("b", 4)
    mix = TaskMixture([a, b], seed=3, start=2, stop=10)
    assert len(mix) == 8
    for i in range(8):
        t, local = mix.source_of(2 + i)
        assert mix[i] == [a, b][t][local]


def test_sequence_concatenates_in_order():
    a, b, c = Numbers("a", 3), Numbers("b", 0), Numbers("c", 4, start=1)
    seq = TaskSequence([a, b, c])
    assert ids(seq) == [("a", 0), ("a", 1), ("a", 2), ("c", 1), ("c", 2), ("c", 3)]
    assert seq[-1]["i"] == 3
    assert ids(seq[2:5]) == [("a", 2), ("c", 1), ("c", 2)]


def test_mixture_of_sequences_and_eval_type():
    a, b = Numbers("a", 3), Numbers("b", 2)
    a.eval_type = b.eval_type = "generative"
    mix = TaskMixture([TaskSequence([a, b]), a], seed=0)
    assert sorted(ids(mix)) == sorted(ids(a) * 2 + ids(b))
    assert mix.eval_type == "generative"
    b.eval_type = "categorical"
    assert TaskMixture([a, b]).eval_type is None


def test_empty_combinations_are_errors():
    with pytest.raises(DataError, match="at least one task"):
        TaskMixture([])
    with pytest.raises(DataError, match="at least one task"):
        TaskSequence([])
    with pytest.raises(TypeError, match="expected Task objects"):
        TaskMixture([[1, 2]])
