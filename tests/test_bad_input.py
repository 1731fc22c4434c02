"""Bad text and big inputs in the data path: each bad input gets an error naming the file, the line and the reason
(docs/bad_input.md is the table), or under --skip-bad-rows is left out and counted; no crash, no raw traceback."""

import gzip
import json
import logging
import subprocess
import sys
import textwrap

import pytest

from fastsft.cli import main
from fastsft.data import DataError, load_mixture, load_task
from fastsft.data.files import read_file
from fastsft.inspect import load_tokenizer
from fastsft.loader import PackedBatchStream
from fastsft.tokenizer import TextEncodingError, Tokenizer


def chat_line(i: int) -> bytes:
    row = {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
    return json.dumps(row).encode() + b"\n"


def write(path, *lines: bytes):
    path.write_bytes(b"".join(lines))
    return path


BAD_LINES = {
    # JSON can spell a lone surrogate; UTF-8 cannot, so the tokenizer could not encode it.
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "hi \\ud800"}, '
                       b'{"role": "assistant", "content": "ok"}]}\n', "lone surrogate in a text"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "hi \xff\xfe"}, '
                      b'{"role": "assistant", "content": "ok"}]}\n', "invalid UTF-8 line: byte 0xff at byte 47"),
    "deep nesting": (b'{"messages": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "JSON nested too deeply"),
    "too long": (b'{"messages": [{"role": "user", "content": "' + b"a" * 70_000 + b'"}]}\n',
                 "line longer than max_row_bytes: more than 65,536 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_a_named_row_error_and_skippable(tmp_path, case):
    line, reason = BAD_LINES[case]
    path = write(tmp_path / "data.jsonl", chat_line(0), chat_line(1), line, chat_line(3))
    spec = f"jsonl:{path}?max_row_bytes=65536"
    with pytest.raises(DataError) as error:
        load_task(spec)
    message = str(error.value)
    assert str(path) in message and "line 3: " + reason in message and "--skip-bad-rows" in message
    task = load_task(spec, on_error="skip")
    assert len(task) == 3 and sum(task.skipped.values()) == 1 and task[2] == json.loads(chat_line(3))
    assert task.row_number(2) == "line 4"


def test_bad_line_through_the_cli(tmp_path, capsys):
    path = write(tmp_path / "data.jsonl", chat_line(0), BAD_LINES["lone surrogate"][0], chat_line(2))
    assert main(["inspect", "--data", f"jsonl:{path}", "--color", "never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastsft inspect: error: jsonl:{path}: line 2: lone surrogate") and "--skip-bad-rows" in err
    assert "on_error" not in err.split("--skip-bad-rows")[0]  # the command-line way comes first
    assert main(["inspect", "--data", f"jsonl:{path}", "--color", "never", "--skip-bad-rows"]) == 0
    assert "skipped 1 rows: 1 x lone surrogate in a text (not valid Unicode)" in capsys.readouterr().out


def test_a_file_of_only_bad_lines(tmp_path):
    path = write(tmp_path / "data.jsonl", b"{x\n", b"\xff\n")
    with pytest.raises(DataError, match=r"empty dataset: all 2 lines were skipped\n.*1 x malformed JSON line; "
                                        r"1 x invalid UTF-8 line"):
        load_task(f"jsonl:{path}", on_error="skip")


def test_invalid_utf8_in_a_json_document_names_the_row(tmp_path):
    rows = b'[{"instruction": "a", "output": "b"}, {"instruction": "c \xff", "output": "d"}]'
    path = write(tmp_path / "data.json", rows)
    with pytest.raises(DataError, match=r"row 1: lone surrogate in a text .*U\+DCFF.*invalid UTF-8 byte 0xff"):
        load_task(f"alpaca:{path}")
    assert len(load_task(f"alpaca:{path}", on_error="skip")) == 1


def test_lone_surrogate_from_any_task_names_the_conversation():
    # Rows that bypass file reading (a Python task) still meet the tokenizer's check, named by task and position.
    from helpers import ListTask

    texts = ["bad \udc80" if i == 7 else "fine" for i in range(10)]
    surrogates = ListTask("py-task", [{"messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": t}]} for t in texts])

    tokenizer = Tokenizer.train_from_iterator(["fine q"] * 5, 300)
    with pytest.raises(DataError, match=r"py-task: conversation 7: a text is not valid Unicode \(lone surrogate "
                                        r"U\+DC80 at character 4\)"):
        list(PackedBatchStream(surrogates, tokenizer, rows=2, seq_len=32))
    with pytest.raises(TextEncodingError, match=r"text 1: not valid Unicode"):
        tokenizer.encode_batch(["ok", "x\ud800"])


def test_gzip_bomb_stops_at_the_row_limit(tmp_path):
    # 64 MB of one line compress to ~64 KB; the reader must stop at max_row_bytes, not inflate it into memory.
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(chat_line(0))
        f.write(b'{"messages": "' + b"A" * (64 << 20))
        f.write(b'"}\n')
        f.write(chat_line(2))
    assert path.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"bomb.jsonl.gz: line 2: line longer than max_row_bytes: more than "
                                        r"1,000,000 bytes.*\?max_row_bytes=N"):
        load_task(f"jsonl:{path}?max_row_bytes=1000000")
    task = load_task(f"jsonl:{path}?max_row_bytes=1000000", on_error="skip")
    assert len(task) == 2 and task.skipped == {"line longer than max_row_bytes": 1}


def test_gzip_bomb_within_bounded_memory(tmp_path):
    # The default limit, in a process whose address space is capped: reading must not hold the inflated line.
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(chat_line(0))
        for _ in range(96):  # 96 x 4 MiB = 384 MiB in one line, above the 64 MiB default limit
            f.write(b"[" * (4 << 20))
        f.write(b"\n")
        f.write(chat_line(1))
    script = textwrap.dedent(f"""
        import resource
        from fastsft.data import load_task
        def peak_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before = peak_mib()
        task = load_task({f"jsonl:{path}"!r}, on_error="skip")
        print(len(task), dict(task.skipped), round(peak_mib() - before))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, *_, grown = proc.stdout.split()
    assert count == "2" and "line longer than max_row_bytes" in proc.stdout
    # One piece of at most max_row_bytes is held at a time; the whole line would be 384 MiB.
    assert int(grown) < 64 + 128, f"peak memory grew by {grown} MiB while reading"


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not gzip"])
def test_broken_gzip_names_the_file(tmp_path, damage):
    good = gzip.compress(b"".join(chat_line(i) for i in range(2000)))
    data = {"truncated": good[: len(good) // 2], "corrupt": good[:60] + b"\x00" * 64 + good[124:],
            "not gzip": b"this is not gzip data at all"}[damage]
    path = write(tmp_path / "rows.jsonl.gz", data)
    with pytest.raises(DataError, match=r"rows.jsonl.gz: corrupt or truncated gzip data after line \d+"):
        load_task(f"jsonl:{path}")
    json_path = write(tmp_path / "rows.json.gz", data)
    with pytest.raises(DataError, match=r"rows.json.gz: corrupt or truncated gzip data"):
        load_task(f"jsonl:{json_path}")


def test_memory_of_a_read_file_stays_near_its_size(tmp_path):
    # Rows are kept as raw lines (fastsft.data.files.JsonLines): parsed dicts took about 3x the file in RSS.
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        for i in range(60_000):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i} " + "lorem ipsum " * 20},
                                             {"role": "assistant", "content": f"answer {i} " + "dolor sit " * 30}]},
                               ).encode() + b"\n")
    size_mib = path.stat().st_size / 2**20
    script = textwrap.dedent(f"""
        import gc
        from fastsft.data import load_task
        def rss_mib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
        before = rss_mib()
        task = load_task({f"jsonl:{path}"!r})
        gc.collect()
        print(len(task), rss_mib() - before)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, grown = proc.stdout.split()
    assert count == "60000"
    assert float(grown) < 1.5 * size_mib, f"reading {size_mib:.0f} MiB took {float(grown):.0f} MiB"


def test_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + chat_line(0), chat_line(1))
    assert [t["messages"][0]["content"] for t in load_task(f"jsonl:{path}")] == ["question 0", "question 1"]
    json_path = write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "output": "b"}])
                      .encode())
    assert len(load_task(f"alpaca:{json_path}")) == 1


def test_a_path_with_a_question_mark(tmp_path):
    path = write(tmp_path / "what?.jsonl", chat_line(0), chat_line(1), chat_line(2))
    assert len(load_task(f"jsonl:{path}")) == 3
    assert len(load_task(f"jsonl:{path}?stop=2")) == 2  # options still start at the last '?' with KEY=VALUE


@pytest.mark.parametrize("spec", ["gsm8k*2x", "gsm8k:openai/gsm8k*x", "synthetic:spell*", "synthetic:spell* 2"])
def test_a_repeat_typo_is_named(spec):
    with pytest.raises(DataError, match=r"bad repeat .*'\*N' needs a whole number"):
        load_mixture(spec)


def test_field_mapping_in_the_spec(tmp_path):
    rows = [{"instruction": f"say {i}", "response": f"{i}"} for i in range(4)]
    path = tmp_path / "near_alpaca.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"needs \['instruction', 'output'\].*alpaca:FILE\?output=NAME_IN_THE_FILE"):
        load_task(f"alpaca:{path}")
    with pytest.raises(DataError, match=r"unknown field layout.*alpaca:FILE\?output=response"):
        load_task(f"jsonl:{path}")  # layout detection says how to map as well
    mapped = load_task(f"alpaca:{path}?output=response")
    assert mapped[2] == {"messages": [{"role": "user", "content": "say 2"}, {"role": "assistant", "content": "2"}]}
    assert load_task(f"jsonl:{path}?output=response&stop=3")[2] == mapped[2]  # the layout is detected after mapping
    with pytest.raises(DataError, match=r"'answer' is neither an option nor a field of a alpaca row"):
        load_task(f"alpaca:{path}?answer=response")


def test_seq_len_zero_is_rejected_before_a_tokenizer_is_trained(monkeypatch, capsys):
    import fastsft.inspect

    monkeypatch.setattr(fastsft.inspect, "load_tokenizer", lambda *_: pytest.fail("tokenizer made first"))
    assert main(["inspect", "--data", "synthetic:spell?size=10", "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 2, got 0" in capsys.readouterr().err


def test_zero_supervised_targets_stop_inspect(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}] * 6
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["inspect", "--data", f"jsonl:{path}", "--seq-len", "16", "--color", "never"]) == 2
    captured = capsys.readouterr()
    assert "targets at T     0 supervised targets" in captured.out  # the statistics are shown first
    assert "no supervised target at T=16: 6 of 6 conversations are longer than T=16" in captured.err


def gpt2_files(folder):
    """A minimal GPT-2 vocab.json + merges.txt pair: the 256 byte tokens and one merge."""
    from fastsft.tokenizer import _BYTE_TO_CHAR

    vocab = {_BYTE_TO_CHAR[b]: b for b in range(256)}
    vocab["ab"] = 256
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    return folder


def test_tokenizer_given_as_a_file_of_the_gpt2_pair(tmp_path):
    gpt2_files(tmp_path)
    tok, desc = load_tokenizer(str(tmp_path / "vocab.json"), [])
    assert tok.vocab_size == 257 + 9 and f"GPT-2 BPE from {tmp_path}" in desc
    assert tok.encode("ab") == [256]
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="needs vocab.json and merges.txt side by side"):
        load_tokenizer(str(tmp_path / "vocab.json"), [])


def test_tokenizer_file_that_is_not_a_tokenizer(tmp_path, capsys):
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert main(["inspect", "--data", "synthetic:spell?size=10", "--tokenizer", str(tmp_path / "other.json")]) == 2
    assert "other.json: not a tokenizer.json" in capsys.readouterr().err


def test_skipped_rows_go_to_logging_not_stderr(tmp_path, caplog):
    path = write(tmp_path / "data.jsonl", chat_line(0), b"{not json\n", chat_line(2))
    script = f"from fastsft.data import load_task; load_task({f'jsonl:{path}'!r}, on_error='skip')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""  # a library logs; it does not write to the terminal itself
    with caplog.at_level(logging.WARNING, logger="fastsft.data"):
        load_task(f"jsonl:{path}", on_error="skip")
    assert "skipped 1 rows: 1 x malformed JSON line" in caplog.text


def test_json_document_over_the_size_limit(tmp_path, monkeypatch):
    import fastsft.data.files

    monkeypatch.setattr(fastsft.data.files, "MAX_JSON_BYTES", 1000)  # the real limit is 1 GiB
    path = tmp_path / "big.json.gz"
    path.write_bytes(gzip.compress(json.dumps([{"instruction": "a" * 600, "output": "b"}] * 4).encode()))
    with pytest.raises(DataError, match=r"big.json.gz: a .json document larger than 1,000 bytes; store the rows as "
                                        r"JSON Lines"):
        load_task(f"alpaca:{path}")
