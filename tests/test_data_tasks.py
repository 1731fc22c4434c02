"""Built-in tasks on real data: field mapping, GSM8K calculator parts, multiple choice, HumanEval.

The tests read the first rows of each data set kept in the repo (tests/fixtures/data); the whole files in the
shared data folder, where it exists, are checked by test_whole_shared_files.
"""

import gzip
import json
import random
import re

import pytest

from fastsft.chat import normalize_conversation
from fastsft.data import ARC, GSM8K, MMLU, HumanEval, build_program, load_task, render_multiple_choice
from fastsft.data.gsm8k import calculator_parts, extract_answer


def read_jsonl(path, limit=None):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(limit or 10**9))]


@pytest.fixture(scope="module")
def gsm8k(fixture_data):
    return GSM8K(str(fixture_data / "gsm8k_train.jsonl"))


def rejoin(parts):
    """Inverse of the calculator split: parts back to GSM8K's answer text."""
    out = []
    for p in parts:
        if p["type"] == "python":
            out.append(f"<<{p['text']}=")
        elif p["type"] == "python_output":
            out.append(f"{p['text']}>>")
        else:
            out.append(p["text"])
    return "".join(out)


def check_gsm8k(gsm8k, raw, sample):
    assert len(gsm8k) == len(raw)
    for i in random.Random(5).sample(range(len(raw)), min(sample, len(raw))):
        conv = gsm8k[i]
        user, assistant = conv["messages"]
        assert user == {"role": "user", "content": raw[i]["question"]}
        parts = assistant["content"]
        assert rejoin(parts) == raw[i]["answer"]
        kinds = [p["type"] for p in parts]
        assert kinds.count("python") == kinds.count("python_output") == raw[i]["answer"].count("<<")
        for k, kind in enumerate(kinds):  # every call is followed by its output
            if kind == "python":
                assert kinds[k + 1] == "python_output"
        assert parts[-1]["type"] == "text" and "####" in parts[-1]["text"]
        normalize_conversation(conv)


def test_gsm8k_parts_rebuild_the_answer(gsm8k, fixture_data):
    raw = read_jsonl(fixture_data / "gsm8k_train.jsonl")
    assert len(raw) == 40
    check_gsm8k(gsm8k, raw, 40)


def test_gsm8k_first_example(gsm8k):
    parts = gsm8k[0]["messages"][1]["content"]
    assert parts[:4] == [{"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
                         {"type": "python_output", "text": "24"},
                         {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "}]


def test_calculator_parts_edge_cases():
    assert calculator_parts("no calls\n#### 3") == [{"type": "text", "text": "no calls\n#### 3"}]
    # An '=' inside the expression: the result is after the last one.
    assert calculator_parts("<<a=b=7>>") == [{"type": "python", "text": "a=b"}, {"type": "python_output", "text": "7"}]


def test_gsm8k_evaluate(gsm8k):
    conv = gsm8k[1]  # Weng: #### 10
    assert gsm8k.evaluate(conv, "She earned 10 dollars.\n#### 10")
    assert gsm8k.evaluate(conv, "#### 10.0")
    assert not gsm8k.evaluate(conv, "#### 11")
    assert not gsm8k.evaluate(conv, "the answer is 10")  # no '####', no answer
    assert extract_answer("#### 1,234") == "1234" and extract_answer("#### -5.") == "-5"


def check_arc(task, raw):
    assert task.eval_type == "categorical" and len(task) == len(raw)
    for i in (0, 1, len(raw) // 2, len(raw) - 1):
        conv, row = task[i], raw[i]
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        assert conv["letters"] == labels
        user = conv["messages"][0]["content"]
        assert user.startswith(f"Multiple Choice question: {row['question']}\n")
        for label, text in zip(labels, texts):
            assert f"\n- {text}={label}\n" in user  # choice, '=', letter: no space before the letter
        assert user.endswith("\n\nRespond only with the letter of the correct answer.")
        assert conv["messages"][1] == {"role": "assistant", "content": row["answerKey"]}
        assert task.evaluate(conv, row["answerKey"]) and task.evaluate(conv, f" {row['answerKey']}\n")
        wrong = next(x for x in labels if x != row["answerKey"])
        assert not task.evaluate(conv, wrong) and not task.evaluate(conv, "Z")


def test_arc_multiple_choice(fixture_data):
    check_arc(ARC(str(fixture_data / "arc_easy_test.jsonl")), read_jsonl(fixture_data / "arc_easy_test.jsonl"))


def test_arc_challenge_kind(fixture_data):
    task = load_task(f"arc-challenge:{fixture_data / 'arc_easy_test.jsonl'}")
    assert task.kind == "arc-challenge" and task.name.startswith("arc-challenge:")


def check_mmlu(task, raw):
    assert len(task) == len(raw)
    answers = {task[i]["messages"][1]["content"] for i in range(len(task))}
    assert answers == {"A", "B", "C", "D"}
    for i in random.Random(3).sample(range(len(raw)), 20):
        conv, row = task[i], raw[i]
        assert conv["letters"] == ["A", "B", "C", "D"] and conv["subject"] == row["subject"]
        assert conv["messages"][0]["content"] == render_multiple_choice(row["question"], "ABCD", row["choices"])
        assert conv["messages"][1]["content"] == "ABCD"[row["answer"]]
        assert task.evaluate(conv, "ABCD"[row["answer"]])
        assert not task.evaluate(conv, "ABCD"[(row["answer"] + 1) % 4])


@pytest.mark.parametrize("name", ["mmlu_dev.jsonl", "mmlu_validation.jsonl"])
def test_mmlu_multiple_choice(fixture_data, name):
    check_mmlu(MMLU(str(fixture_data / name)), read_jsonl(fixture_data / name))


def test_render_multiple_choice_layout():
    text = render_multiple_choice("Which?", ["A", "B"], ["one", "two"])
    assert text == ("Multiple Choice question: Which?\n- one=A\n- two=B\n\n"
                    "Respond only with the letter of the correct answer.")


def test_humaneval_fields_and_program(fixture_data):
    raw = read_jsonl(fixture_data / "humaneval.jsonl.gz")
    task = HumanEval(str(fixture_data / "humaneval.jsonl.gz"))
    assert task.eval_type == "generative" and len(task) == len(raw) == 13
    assert raw[12]["task_id"] == "HumanEval/53"
    for i in (0, 2, 12):
        conv, row = task[i], raw[i]
        assert conv["task_id"] == row["task_id"] and conv["entry_point"] == row["entry_point"]
        assert conv["test"] == row["test"]
        assert conv["messages"][0]["content"] == row["prompt"]
        assert conv["messages"][1]["content"] == row["prompt"] + "\n" + row["canonical_solution"]
        # The program passes with the reference solution and fails with a wrong one.
        exec(build_program(conv, f"```python\n{conv['messages'][1]['content']}\n```"), {})
        code = row["prompt"] + row["canonical_solution"]
        broken = re.sub(r"(def \w+\(.*\).*:)", r"\1\n    return None", code, count=1)
        with pytest.raises(AssertionError):
            exec(build_program(conv, broken), {})
    assert task.evaluate(task[0], "pass") is False  # runs in the sandbox now (tests/test_eval.py)


def test_whole_shared_files(shared_data):
    # The large external check: every row of the full data sets maps (the fixtures hold only their first rows).
    gsm8k_raw = read_jsonl(shared_data / "gsm8k_train.jsonl")
    assert len(gsm8k_raw) == 7473
    check_gsm8k(GSM8K(str(shared_data / "gsm8k_train.jsonl")), gsm8k_raw, 200)
    arc_raw = read_jsonl(shared_data / "arc_easy_test.jsonl")
    assert len(arc_raw) == 2376
    check_arc(ARC(str(shared_data / "arc_easy_test.jsonl")), arc_raw)
    for name, rows in (("mmlu_dev.jsonl", 285), ("mmlu_validation.jsonl", 1531)):
        raw = read_jsonl(shared_data / name)
        assert len(raw) == rows
        check_mmlu(MMLU(str(shared_data / name)), raw)
    assert len(HumanEval(str(shared_data / "humaneval.jsonl.gz"))) == 164
