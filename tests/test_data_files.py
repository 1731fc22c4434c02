"""Data sources: file readers, layout detection and mapping, the bad-row policy, the hub path (no network)."""

import gzip
import json
import sys
import types

import pytest

from fastsft.data import ConversationFile, DataError, GSM8K, SmolTalk, load_task
from fastsft.data.files import read_file


def write_lines(path, items):
    """Write JSONL; str items are written raw (to make malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return path


def chat(i, system=False):
    messages = [{"role": "system", "content": f"Be brief #{i}."}] if system else []
    messages += [{"role": "user", "content": f"question {i} ü"}, {"role": "assistant", "content": f"answer {i}"},
                 {"role": "user", "content": f"follow-up {i}"}, {"role": "assistant", "content": f"more {i}"}]
    return {"messages": messages}


SMOLTALK_ROWS = [chat(i, system=i % 3 == 0) for i in range(7)]


def test_smoltalk_jsonl_maps_messages_and_keeps_system(tmp_path):
    path = write_lines(tmp_path / "smol.jsonl", SMOLTALK_ROWS)
    task = SmolTalk(str(path))
    assert len(task) == 7
    for i in range(7):
        assert task[i] == SMOLTALK_ROWS[i]  # the system message is kept; render merges it
    assert task.row_number(3) == "line 4"


def test_smoltalk_parquet_matches_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.Table.from_pylist(SMOLTALK_ROWS), tmp_path / "smol.parquet")
    task = SmolTalk(str(tmp_path / "smol.parquet"))
    assert [task[i] for i in range(len(task))] == SMOLTALK_ROWS


def test_examples_are_fresh_dicts(tmp_path):
    task = SmolTalk(str(write_lines(tmp_path / "smol.jsonl", SMOLTALK_ROWS)))
    task[1]["messages"][0]["content"] = "changed"
    assert task[1] == SMOLTALK_ROWS[1]


def test_json_list_json_object_and_gzip(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(SMOLTALK_ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": SMOLTALK_ROWS, "version": 2}))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in SMOLTALK_ROWS) + "\n\n")  # blank lines are not rows
    for name in ("a.json", "b.json", "c.jsonl.gz"):
        task = load_task(f"jsonl:{tmp_path / name}")
        assert [task[i] for i in range(len(task))] == SMOLTALK_ROWS, name


def test_sharegpt_layout_detected_and_mapped(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi 1"},
                               {"from": "gpt", "value": "hello 1"}]},
            {"system": "top system",
             "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]}]
    path = write_lines(tmp_path / "share.jsonl", rows)
    for spec in (f"jsonl:{path}", f"sharegpt:{path}"):
        task = load_task(spec)
        assert task.layout == "sharegpt"
        assert task[0]["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi 1"},
                                       {"role": "assistant", "content": "hello 1"}]
        assert task[1]["messages"][0] == {"role": "system", "content": "top system"}


def test_alpaca_mapping_with_input_system_and_history(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "input": "", "output": "Hi!", "system": "Be kind.",
             "history": [["first?", "yes"]]}]
    task = load_task(f"alpaca:{write_lines(tmp_path / 'al.jsonl', rows)}")
    assert task[0]["messages"] == [{"role": "user", "content": "Add.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]
    assert task[1]["messages"] == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Greet."},
        {"role": "assistant", "content": "Hi!"}]


def check_alpaca_file(path, rows):
    task = load_task(f"jsonl:{path}")
    raw = json.loads(path.read_text())
    assert task.layout == "alpaca" and len(task) == len(raw) == rows
    with_input = next(i for i, row in enumerate(raw) if row["input"].strip())
    for i in (0, 17, with_input, rows - 1):
        user = raw[i]["instruction"] + (f"\n\n{raw[i]['input']}" if raw[i]["input"].strip() else "")
        assert task[i]["messages"] == [{"role": "user", "content": user},
                                       {"role": "assistant", "content": raw[i]["output"]}]


def test_alpaca_file(fixture_data):
    check_alpaca_file(fixture_data / "alpaca_en_demo.json", 40)


def test_whole_shared_alpaca_file(shared_data):
    check_alpaca_file(shared_data / "alpaca_en_demo.json", 999)


# --- construction errors ------------------------------------------------------------------------------------------


def test_missing_file_is_a_clear_error(tmp_path):
    for spec in (f"gsm8k:{tmp_path / 'nope.jsonl'}", f"jsonl:{tmp_path / 'nope.parquet'}", "sharegpt:./x/y/z"):
        with pytest.raises(DataError, match="not found"):
            load_task(spec)


def test_unknown_file_type(tmp_path):
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        read_file(tmp_path / "rows.csv")


def test_unknown_layout_names_fields(tmp_path):
    path = write_lines(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}] * 3)
    with pytest.raises(DataError, match=r"unknown field layout.*'completion', 'prompt'"):
        load_task(f"jsonl:{path}")
    with pytest.raises(DataError, match=r"unknown field layout.*needs \['question', 'answer'\]"):
        GSM8K(str(path))


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "empty.json").write_text("[]")
    for name in ("empty.jsonl", "empty.json"):
        with pytest.raises(DataError, match="empty dataset"):
            load_task(f"smoltalk:{tmp_path / name}")


def test_all_rows_bad_under_skip_is_empty(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}] * 4)
    with pytest.raises(DataError, match="all 4 rows were skipped"):
        SmolTalk(str(path), on_error="skip")


def test_bad_on_error_value(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        SmolTalk(str(write_lines(tmp_path / "s.jsonl", SMOLTALK_ROWS)), on_error="ignore")


# --- the bad-row policy: each case under both policies --------------------------------------------------------------

GOOD_GSM = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(3, 8)]
GOOD_ARC = [{"id": str(i), "question": f"Pick {i}", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
             "answerKey": "B"} for i in range(4)]
GOOD_MMLU = [{"question": f"Q{i}", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(4)]
GOOD_SHARE = [{"conversations": [{"from": "human", "value": f"h{i}"}, {"from": "gpt", "value": f"g{i}"}]}
              for i in range(4)]

BAD_ROWS = [
    # (kind, good rows, bad line (raw str or row), reason fragment)
    ("smoltalk", SMOLTALK_ROWS, '{"messages": [{"role": "user", "content": "cut', "malformed JSON"),
    ("smoltalk", SMOLTALK_ROWS, "[1, 2, 3]", "row is a list, not an object"),
    ("smoltalk", SMOLTALK_ROWS, {"text": "no messages"}, "missing field 'messages'"),
    ("smoltalk", SMOLTALK_ROWS, {"messages": "hello"}, "field 'messages' has type str, expected list"),
    ("smoltalk", SMOLTALK_ROWS, {"messages": [{"role": "assistant", "content": "first"}]}, "expected role 'user'"),
    ("smoltalk", SMOLTALK_ROWS, {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
     "unknown role 'tool'"),
    ("smoltalk", SMOLTALK_ROWS, {"messages": []}, "'messages' is empty"),
    ("gsm8k", GOOD_GSM, {"question": "q", "answer": "no final number"}, "no final '#### N'"),
    ("gsm8k", GOOD_GSM, {"question": "q", "answer": "1+1 = <<1+1>>2\n#### 2"}, "without '='"),
    ("gsm8k", GOOD_GSM, {"question": 7, "answer": "#### 2"}, "field 'question' has type int"),
    ("arc-easy", GOOD_ARC, {**GOOD_ARC[0], "answerKey": "E"}, "answerKey is not one of the choice labels"),
    ("arc-easy", GOOD_ARC, {**GOOD_ARC[0], "choices": {"text": ["x"], "label": ["A", "B"]}}, "equally long"),
    ("mmlu", GOOD_MMLU, {**GOOD_MMLU[0], "answer": 4}, "not an index into 'choices'"),
    ("sharegpt", GOOD_SHARE, {"conversations": [{"from": "tool", "value": "x"}]}, "unknown ShareGPT speaker 'tool'"),
]


@pytest.mark.parametrize("kind,good,bad,reason", BAD_ROWS, ids=[f"{c[0]}-{c[3][:24]}" for c in BAD_ROWS])
def test_bad_row_policy(tmp_path, kind, good, bad, reason):
    bad_line = 3  # 1-based line of the bad row
    rows = good[: bad_line - 1] + [bad] + good[bad_line - 1:]
    path = write_lines(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_task(f"{kind}:{path}")
    message = str(info.value)
    assert str(path) in message and f"line {bad_line}:" in message and reason in message
    task = load_task(f"{kind}:{path}", on_error="skip")
    assert len(task) == len(good)
    clean = load_task(f"{kind}:{write_lines(tmp_path / 'clean.jsonl', good)}")
    assert [task[i] for i in range(len(task))] == [clean[i] for i in range(len(clean))]
    assert task.row_number(bad_line - 1) == f"line {bad_line + 1}"  # rows after the bad one keep their line numbers
    assert sum(task.skipped.values()) == 1
    (got_reason,) = task.skipped
    assert reason in got_reason
    assert f"skipped 1 rows: 1 x {got_reason}" in task.skip_summary()


def test_skip_counts_by_reason(tmp_path):
    rows = SMOLTALK_ROWS + [{"text": 1}, "{oops", {"text": 2}, {"messages": []}]
    task = SmolTalk(str(write_lines(tmp_path / "s.jsonl", rows)), on_error="skip")
    assert len(task) == len(SMOLTALK_ROWS)
    assert task.skipped["missing field 'messages'"] == 2
    assert task.skipped["malformed JSON line"] == 1
    assert sum(task.skipped.values()) == 4


# --- the hub path: same rows, same mapping ---------------------------------------------------------------------------


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module whose load_dataset returns rows registered by the test."""
    calls, tables = [], {}

    def load_dataset(path, name=None, split=None, trust_remote_code=None):
        # datasets < 4 declares the switch: fastsft must turn remote code off explicitly.
        assert trust_remote_code is False, "the hub loader must pass trust_remote_code=False"
        calls.append((path, name, split))
        return tables[(path, name, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls, tables


def test_hub_path_uses_the_same_mapping(fixture_data, fake_datasets):
    calls, tables = fake_datasets
    path = fixture_data / "gsm8k_train.jsonl"
    rows = [json.loads(line) for line in open(path)]
    tables[("openai/gsm8k", "main", "test")] = rows
    from_file = load_task(f"gsm8k:{path}")
    for spec in ("gsm8k:openai/gsm8k@test", "gsm8k:@test"):
        from_hub = load_task(spec)
        assert calls[-1] == ("openai/gsm8k", "main", "test")
        assert len(from_hub) == len(from_file) == len(rows) == 40
        assert all(from_hub[i] == from_file[i] for i in range(40))


def test_hub_default_ids_and_configs(tmp_path, fake_datasets):
    calls, tables = fake_datasets
    tables[("allenai/ai2_arc", "ARC-Challenge", "test")] = GOOD_ARC
    tables[("cais/mmlu", "auxiliary_train", "train")] = [{"train": row} for row in GOOD_MMLU]  # the hub's wrapper
    from_hub = load_task("arc-challenge")
    assert calls[-1] == ("allenai/ai2_arc", "ARC-Challenge", "test")
    from_file = load_task(f"arc-challenge:{write_lines(tmp_path / 'arc.jsonl', GOOD_ARC)}")
    assert [from_hub[i] for i in range(4)] == [from_file[i] for i in range(4)]
    aux = load_task("mmlu:@train?subset=auxiliary_train")
    assert calls[-1] == ("cais/mmlu", "auxiliary_train", "train")
    assert [aux[i] for i in range(4)] == [load_task(f"mmlu:{write_lines(tmp_path / 'm.jsonl', GOOD_MMLU)}")[i]
                                          for i in range(4)]


def test_hub_bad_rows_name_the_row(fake_datasets):
    _, tables = fake_datasets
    tables[("HuggingFaceTB/smol-smoltalk", None, "train")] = SMOLTALK_ROWS[:2] + [{"messages": []}]
    with pytest.raises(DataError, match=r"smoltalk:HuggingFaceTB/smol-smoltalk@train: row 2: 'messages' is empty"):
        SmolTalk()
    assert len(SmolTalk(on_error="skip")) == 2


def test_hub_loader_of_datasets_4_gets_no_remote_code_switch(monkeypatch):
    # datasets >= 4 runs no loading scripts and rejects the argument: it must not be passed there.
    seen = {}

    def load_dataset(path, name=None, split=None, **config_kwargs):
        seen.update(config_kwargs, split=split)
        return SMOLTALK_ROWS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert len(SmolTalk()) == len(SMOLTALK_ROWS) and seen == {"split": "train"}


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"optional `datasets` package.*fastsft\[hub\]"):
        load_task("smoltalk:HuggingFaceTB/smol-smoltalk")


def test_conversation_file_rejects_unknown_layout_name(tmp_path):
    with pytest.raises(ValueError, match="layout must be"):
        ConversationFile(str(tmp_path / "x.jsonl"), layout="csv")


def test_malformed_json_file_names_the_line(tmp_path):
    (tmp_path / "lines.json").write_text('{"messages": []}\n{"messages": []}\n')
    with pytest.raises(DataError, match=r"lines.json: malformed JSON at line 2, column 1 .*name the file .jsonl"):
        load_task(f"jsonl:{tmp_path / 'lines.json'}")
    (tmp_path / "cut.json").write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ')
    with pytest.raises(DataError, match=r"cut.json: malformed JSON at line 2"):
        load_task(f"alpaca:{tmp_path / 'cut.json'}")


def test_skipped_rows_are_logged(tmp_path, caplog):
    path = write_lines(tmp_path / "s.jsonl", SMOLTALK_ROWS + [{"messages": []}])
    with caplog.at_level("WARNING", logger="fastsft.data"):
        SmolTalk(str(path), on_error="skip")
    assert "skipped 1 rows: 1 x 'messages' is empty" in caplog.text and "kept 7" in caplog.text


def test_rows_argument_and_hub_subset(fake_datasets):
    calls, tables = fake_datasets
    task = SmolTalk(rows=SMOLTALK_ROWS[:3], on_error="skip")
    assert task.name == "smoltalk:<3 rows>" and task[2] == SMOLTALK_ROWS[2]
    tables[("HuggingFaceTB/smoltalk", "all", "test")] = SMOLTALK_ROWS
    assert len(load_task("smoltalk:HuggingFaceTB/smoltalk@test?subset=all")) == len(SMOLTALK_ROWS)
    assert calls[-1] == ("HuggingFaceTB/smoltalk", "all", "test")
