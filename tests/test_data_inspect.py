"""`fastsft inspect` end to end (in process, stdout captured), its numbers checked against the Python reference."""

import json
import random
import re

import numpy as np
import pytest

from fastsft.chat import render_conversation
from fastsft.cli import main
from fastsft.data import load_task
from fastsft.tokenizer import Tokenizer

SEQ_LEN = 96


def conversations(seed, n):
    rng = random.Random(seed)
    words = "alpha beta gamma delta pick the red ball under a tall green tree seven 42 !?".split()
    out = []
    for i in range(n):
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": "You are terse."}] if i % 4 == 0 else []
        for _ in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 30)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 40)))})
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    rows = conversations(1, 37)
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = [m["content"] for r in rows for m in r["messages"]]
    Tokenizer.train_from_iterator(texts * 3, 300).save(root / "tokenizer.json")
    return root


def run(capsys, *args):
    code = main(["inspect", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def number(pattern, text):
    return re.search(pattern, text).group(1).replace(",", "")


def test_single_file_report_matches_reference(files, capsys):
    code, out, _ = run(capsys, "--data", f"jsonl:{files / 'chat.jsonl'}", "--index", "5", "--seq-len", str(SEQ_LEN),
                       "--tokenizer", str(files / "tokenizer.json"), "--color", "never")
    assert code == 0
    tok = Tokenizer.from_file(files / "tokenizer.json")
    task = load_task(f"jsonl:{files / 'chat.jsonl'}")
    rendered = [render_conversation(tok, task[i], max_tokens=10**6) for i in range(len(task))]
    lengths = np.array([len(ids) for ids, _ in rendered])
    supervised = sum(sum(mask) for _, mask in rendered)
    assert "\x1b[" not in out
    ids5, mask5 = rendered[5]
    assert f"conversation 5 (line 6): {len(ids5)} tokens, {sum(mask5)} supervised" in out
    # The visualization shows the conversation's own words between '|' separators.
    assert task[5]["messages"][0]["content"].split()[0] in out and "<|assistant_end|>" in out
    assert int(number(r"statistics over ([\d,]+) conversations \(all\)", out)) == 37
    assert int(number(r"tokens\s+([\d,]+)", out)) == lengths.sum()
    assert int(number(r"supervised\s+([\d,]+)", out)) == supervised
    assert int(number(r"max ([\d,]+)", out)) == lengths.max()
    assert int(number(r"truncated at T\s+([\d,]+)", out)) == (lengths > SEQ_LEN).sum() > 0
    lost = int(np.clip(lengths - SEQ_LEN, 0, None).sum())
    assert int(number(r"losing ([\d,]+) tokens", out)) == lost
    rows = int(number(r"packed at T\s+([\d,]+) rows", out))
    efficiency = float(number(r"efficiency ([\d.]+)%", out))
    assert rows >= -(-(lengths.sum() - lost) // SEQ_LEN)  # no better than perfect packing
    assert efficiency == pytest.approx(100 * (lengths.sum() - lost) / (rows * SEQ_LEN), abs=0.05)


def test_mixture_report_has_task_shares(files, capsys):
    spec = f"jsonl:{files / 'chat.jsonl'}*2,synthetic:spell?size=26"
    code, out, _ = run(capsys, "--data", spec, "--tokenizer", str(files / "tokenizer.json"), "--seq-len", "128",
                       "--index", "3", "--color", "never")
    assert code == 0
    assert "100 conversations in a mixture of 2 tasks (seed 42)" in out
    assert re.search(r"conversation 3 = (jsonl:\S+|synthetic:spell@train) #\d+: \d+ tokens", out)
    table = out[out.index("per task"):]
    chat_line = next(line for line in table.splitlines() if "chat.jsonl" in line)
    spell_line = next(line for line in table.splitlines() if "synthetic:spell" in line)
    assert re.search(r"\s37\s+2\s+74\.0%", chat_line) and re.search(r"\s26\s+1\s+26\.0%", spell_line)
    token_shares = [float(re.findall(r"([\d.]+)%", line)[1]) for line in (chat_line, spell_line)]
    assert sum(token_shares) == pytest.approx(100, abs=0.11)


def test_limit_and_default_tokenizer(files, capsys, monkeypatch):
    monkeypatch.delenv("FASTSFT_TOKENIZER", raising=False)
    code, out, _ = run(capsys, "--data", f"jsonl:{files / 'chat.jsonl'}", "--limit", "10", "--color", "never")
    assert code == 0
    assert "trained a" in out and "byte-level BPE on 37 of these conversations" in out
    assert "statistics over 10 conversations (the first 10 of 37; --limit to change)" in out


def test_colors(files, capsys):
    _, out, _ = run(capsys, "--data", f"jsonl:{files / 'chat.jsonl'}", "--tokenizer", str(files / "tokenizer.json"),
                    "--limit", "5", "--color", "always")
    assert "\x1b[" in out


def test_gsm8k_with_gpt2_files(shared_data, capsys):
    code, out, _ = run(capsys, "--data", f"gsm8k:{shared_data / 'gsm8k_train.jsonl'}", "--seq-len", "2048",
                       "--limit", "40", "--tokenizer", str(shared_data / "gpt2"), "--color", "never")
    assert code == 0
    tok = Tokenizer.from_gpt2(shared_data / "gpt2" / "vocab.json", shared_data / "gpt2" / "merges.txt")
    ids, mask = render_conversation(tok, load_task(f"gsm8k:{shared_data / 'gsm8k_train.jsonl'}")[0])
    assert "GPT-2 BPE" in out
    assert f"conversation 0 (line 1): {len(ids)} tokens, {sum(mask)} supervised" in out
    assert "<|python_start|>|48|/|2|<|python_end|>|<|output_start|>|24|<|output_end|>" in out


def test_the_readme_example_runs_from_a_clone(fixture_data, capsys, monkeypatch):
    # README's inspect example, command and output, is what running it in the repository prints today.
    root = fixture_data.parents[2]
    readme = (root / "README.md").read_text()
    block = readme[readme.index("$ fastsft inspect"):]
    block = block[:block.index("```")]
    command, expected = block.split("\n", 1)
    monkeypatch.chdir(root)
    code, out, _ = run(capsys, *command.split()[3:], "--color", "never")
    assert code == 0 and out == expected


@pytest.mark.parametrize("args,match", [
    (["--data", "gsm8k:missing.jsonl"], "data file not found"),
    (["--data", "synthetic:spell?size=4", "--index", "4"], "--index 4 out of range"),
    (["--data", "synthetic:spell?size=4", "--seq-len", "1"], "--seq-len must be >= 2"),
    (["--data", "synthetic:spell?size=4", "--tokenizer", "nowhere/tok.json"], "no such tokenizer"),
])
def test_errors_are_one_line(capsys, args, match):
    code, out, err = run(capsys, *args)
    assert code == 2 and match in err and "Traceback" not in err


def test_skip_bad_rows_flag(tmp_path, files, capsys):
    good = (files / "chat.jsonl").read_text().splitlines()[:6]
    (tmp_path / "bad.jsonl").write_text("\n".join(good[:3] + ['{"messages": []}'] + good[3:]) + "\n")
    code, _, err = run(capsys, "--data", f"jsonl:{tmp_path / 'bad.jsonl'}", "--color", "never")
    assert code == 2 and "line 4: 'messages' is empty" in err
    code, out, _ = run(capsys, "--data", f"jsonl:{tmp_path / 'bad.jsonl'}", "--skip-bad-rows",
                       "--tokenizer", str(files / "tokenizer.json"), "--color", "never")
    assert code == 0 and "skipped 1 rows: 1 x 'messages' is empty" in out and "6 conversations" in out


def test_index_of_a_sliced_task_names_its_file_line(files, capsys):
    code, out, _ = run(capsys, "--data", f"jsonl:{files / 'chat.jsonl'}?start=4&step=3", "--index", "2",
                       "--tokenizer", str(files / "tokenizer.json"), "--color", "never")
    assert code == 0 and "conversation 2 (line 11)" in out and "statistics over 11 conversations (all)" in out
