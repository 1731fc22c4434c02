"""The evaluation harness: categorical scoring, generative scoring with tools, metrics, ranks, HumanEval in the
sandbox, `fastsft eval` and `fastsft chat`."""

import gzip
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from eval_helpers import ScriptedModel, small_tokenizer, tiny_model
from fastsft.chat import render_for_completion
from fastsft.chat_cli import reply
from fastsft.checkpoint import save
from fastsft.cli import main
from fastsft.data import DataError, HumanEval, Task
from fastsft.data.gsm8k import evaluate_final_answer, extract_answer
from fastsft.engine import Engine
from fastsft.eval import (evaluate_model, format_metrics, multi_turn, pass_at_k, resolve_tasks, select_problems,
                          task_spec)
from fastsft.eval.categorical import choose_letters
from fastsft.model import GPTConfig

LETTERS = ["A", "B", "C", "D"]


class ListTask(Task):
    """An in-memory task: conversations given as a list; categorical or generative (final '####' number)."""

    def __init__(self, conversations, eval_type, name="list"):
        super().__init__()
        self.conversations, self.eval_type, self.name = conversations, eval_type, name

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]

    def evaluate(self, conversation, completion):
        if self.eval_type == "categorical":
            return completion == conversation["messages"][-1]["content"]
        return evaluate_final_answer(conversation, completion)


def choice_conversation(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "letters": list(LETTERS)}


def math_conversation(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"#### {answer}"}]}


QUESTIONS = ["Which?", "What is the capital of France?", "How many apples does Mia have now? A B C D",
             "Spell the word: strawberry", "Mia has 12 apples. She gets 7 more.", "Respond only with the letter."]


# ----------------------------------------------------------------------------------------------------------------
# categorical


class PackedScript(nn.Module):
    """A packed-forward model whose favourite token is never a letter; among the letters it prefers
    LETTERS[position % 4], so the expected answer of a prompt is a function of its length."""

    def __init__(self, tokenizer):
        super().__init__()
        self.config = GPTConfig.seed_era(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.letter_ids = [tokenizer.encode(letter)[0] for letter in LETTERS]
        self.other = tokenizer.encode("apples")[0]
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, ids, position_ids=None, cu_seqlens=None, max_seqlen=None):
        self.calls.append(cu_seqlens.tolist())
        logits = torch.zeros(ids.shape[0], self.config.vocab_size)
        logits[:, self.other] = 50.0
        for p, pos in enumerate(position_ids.tolist()):
            logits[p, self.letter_ids[pos % 4]] = 10.0
            logits[p, self.letter_ids[(pos + 1) % 4]] = 5.0
        return logits


def test_categorical_picks_the_best_allowed_letter_in_one_packed_forward():
    tok = small_tokenizer()
    model = PackedScript(tok)
    conversations = [choice_conversation(q, "A") for q in QUESTIONS]
    picked = choose_letters(model, tok, conversations, batch_size=8)
    lengths = [len(render_for_completion(tok, c)) for c in conversations]
    assert len(set(lengths)) > 2  # prompts of different lengths share the forward
    assert picked == [LETTERS[(n - 1) % 4] for n in lengths]
    assert len(model.calls) == 1 and model.calls[0][-1] == sum(lengths)
    choose_letters(model, tok, conversations, batch_size=4)
    assert len(model.calls) == 3  # 4 + 2 prompts


def test_packed_categorical_equals_each_prompt_alone():
    tok = small_tokenizer()
    model = tiny_model(tok.vocab_size, seed=4)
    conversations = [choice_conversation(q, "A") for q in QUESTIONS]
    picked = choose_letters(model, tok, conversations, batch_size=6)
    letter_ids = torch.tensor([tok.encode(letter)[0] for letter in LETTERS])
    for conversation, letter in zip(conversations, picked):
        with torch.no_grad():
            logits = model(torch.tensor([render_for_completion(tok, conversation)]))[0, -1]
        assert LETTERS[int(logits[letter_ids].argmax())] == letter


def test_categorical_letter_must_be_one_token():
    tok = small_tokenizer()
    conversation = {**choice_conversation("Which?", "A"), "letters": ["A", "zzqx"]}
    with pytest.raises(ValueError, match="ARC row 7: answer letter 'zzqx' is"):
        choose_letters(PackedScript(tok), tok, [conversation], names=["ARC row 7"])


# ----------------------------------------------------------------------------------------------------------------
# generative, metrics


def test_gsm8k_answer_extraction():
    assert extract_answer("so 3 * 4 = 12\n#### 1,234.") == "1234"
    assert extract_answer("no final answer") is None
    reference = math_conversation("q", 1234)
    assert evaluate_final_answer(reference, "work <<tool>> #### 1,234")
    assert evaluate_final_answer(reference, "#### 1234.0")
    assert not evaluate_final_answer(reference, "#### 123")
    assert not evaluate_final_answer(reference, "1234")


def test_pass_at_k():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def tool_script(tok, final="84", stop=True):
    sp = tok.encode_special
    script = tok.encode("Mia has ") + [sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>")]
    script += [tok.encode("9")[0]] * 4  # overridden by the tool's forced output
    script += tok.encode(f" apples.\n#### {final}")
    return script + ([sp("<|assistant_end|>")] if stop else tok.encode("a") * 200)


def test_generative_metrics_of_a_scripted_model():
    tok = small_tokenizer()
    # The script's final number is not what the tool computed, so an accuracy of 1 needs the forced tool output.
    problems = [math_conversation(q, 84) for q in QUESTIONS[:4]] + [math_conversation(QUESTIONS[4], 85)]
    task = ListTask(problems, "generative", "calc")
    engine = Engine(ScriptedModel(tool_script(tok, final="84"), tok.vocab_size, 0), tok)
    expected_tokens = len(engine.generate_batch([tok.bos_id] * 3, max_new_tokens=100)[0].tokens)
    metrics = evaluate_model(engine.model, tok, {"calc": task}, max_new_tokens=100)
    assert metrics["calc/accuracy"] == pytest.approx(0.8) and metrics["calc/centered"] == pytest.approx(0.8)
    assert metrics["calc/stop_rate"] == 1.0 and metrics["calc/mean_answer_tokens"] == expected_tokens
    assert metrics["calc/multi_turn_accuracy"] == pytest.approx(0.8) and metrics["calc/problems"] == 5
    assert metrics["chatcore"] == pytest.approx(0.8)

    bos_ends = ScriptedModel(tool_script(tok)[:-1] + [tok.bos_id], tok.vocab_size, 0)
    metrics = evaluate_model(bos_ends, tok, {"calc": task}, max_new_tokens=100, max_problems=2)
    assert metrics["calc/stop_rate"] == 0.0 and metrics["calc/accuracy"] == 1.0  # <|bos|> ends, but not cleanly

    never_stops = ScriptedModel(tool_script(tok, stop=False), tok.vocab_size, 0)
    metrics = evaluate_model(never_stops, tok, {"calc": task}, max_new_tokens=40, max_problems=2)
    assert metrics["calc/stop_rate"] == 0.0 and metrics["calc/mean_answer_tokens"] == 40
    assert metrics["calc/problems"] == 2


def test_evaluate_model_on_a_random_model_in_train_mode():
    tok = small_tokenizer()
    model = tiny_model(tok.vocab_size, seed=5).train()
    tasks = {"mc": ListTask([choice_conversation(q, "B") for q in QUESTIONS], "categorical"),
             "math": ListTask([math_conversation(q, 3) for q in QUESTIONS], "generative")}
    metrics = evaluate_model(model, tok, tasks, max_problems=3, max_new_tokens=4, num_samples=2, temperature=1.0)
    assert model.training
    assert {"mc/accuracy", "mc/centered", "mc/multi_turn_accuracy", "math/accuracy", "math/pass@2",
            "math/stop_rate", "math/mean_answer_tokens", "chatcore"} <= set(metrics)
    assert "mc/stop_rate" not in metrics
    assert 0 <= metrics["mc/accuracy"] <= 1 and metrics["math/pass@2"] >= metrics["math/accuracy"]
    assert metrics["mc/centered"] == pytest.approx((metrics["mc/accuracy"] - 0.25) / 0.75)
    assert metrics["chatcore"] == pytest.approx((metrics["mc/centered"] + metrics["math/centered"]) / 2)
    assert 1 <= metrics["math/mean_answer_tokens"] <= 4
    assert "mc" in format_metrics(metrics) and "ChatCORE" in format_metrics(metrics)


def test_multi_turn_asks_the_problem_third():
    task = ListTask([math_conversation(q, i) for i, q in enumerate(QUESTIONS)], "generative")
    conversation = multi_turn(task, 5)
    roles = [m["role"] for m in conversation["messages"]]
    assert roles == ["user", "assistant"] * 3
    assert [m["content"] for m in conversation["messages"][::2]] == [QUESTIONS[0], QUESTIONS[1], QUESTIONS[5]]
    assert conversation["messages"][-1]["content"] == "#### 5"


def test_select_problems_spreads_over_the_task():
    assert select_problems(10, None) == list(range(10))
    assert select_problems(100, 4) == [0, 25, 50, 75]
    assert select_problems(3, 10) == [0, 1, 2]


def test_task_names_map_to_specs(tmp_path):
    assert task_spec("arc-easy") == ("ARC-Easy", "arc-easy:@test")
    assert task_spec("gsm8k:x.jsonl") == ("gsm8k:x.jsonl", "gsm8k:x.jsonl")
    (tmp_path / "mmlu_validation.jsonl").write_text("")
    assert task_spec("MMLU", tmp_path) == ("MMLU", f"mmlu:{tmp_path / 'mmlu_validation.jsonl'}")
    with pytest.raises(DataError, match="arc_easy_test.jsonl"):
        task_spec("ARC-Easy", tmp_path)
    tasks = resolve_tasks("spell, synthetic:arithmetic@test?size=5")
    assert list(tasks) == ["spell", "synthetic:arithmetic@test?size=5"] and len(tasks["spell"]) == 1000


# ----------------------------------------------------------------------------------------------------------------
# ranks


def rank_tasks():
    return {"mc": ListTask([choice_conversation(q, "C") for q in QUESTIONS], "categorical"),
            "math": ListTask([math_conversation(q, 3) for q in QUESTIONS], "generative")}


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tok = small_tokenizer()
    metrics = evaluate_model(tiny_model(tok.vocab_size, seed=6), tok, rank_tasks(), max_problems=5, max_new_tokens=3)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(metrics, f)
    dist.destroy_process_group()


def test_ranks_stride_problems_and_reduce_counts(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    tok = small_tokenizer()
    alone = evaluate_model(tiny_model(tok.vocab_size, seed=6), tok, rank_tasks(), max_problems=5, max_new_tokens=3)
    for metrics in ranks:
        assert metrics["mc/problems"] == 5 and metrics["math/problems"] == 5
        for key, value in alone.items():
            if not key.endswith("/seconds"):
                assert metrics[key] == pytest.approx(value), key


# ----------------------------------------------------------------------------------------------------------------
# HumanEval in the sandbox (real data)


FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(params=["fixture", "shared"])
def humaneval_file(request):
    """The 13-problem excerpt in the repository (runs everywhere), and the whole file where ../shared/data is."""
    if request.param == "fixture":
        return FIXTURE_DATA / "humaneval.jsonl.gz"
    return request.getfixturevalue("shared_data") / "humaneval.jsonl.gz"


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail(humaneval_file):
    task = HumanEval(str(humaneval_file))
    with gzip.open(humaneval_file, "rt") as f:
        rows = [json.loads(line) for line in f]
    canonical = [(task[i], rows[i]["prompt"] + rows[i]["canonical_solution"]) for i in range(len(task))]
    # An empty body: the prompt's signature and docstring, then `pass` (returns None).
    empty = [(task[i], rows[i]["prompt"] + "    pass\n") for i in range(0, len(task), max(1, len(task) // 10))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        passed = list(pool.map(lambda pair: task.run(*pair), canonical))
        failed = list(pool.map(lambda pair: task.evaluate(*pair), empty))
    broken = [(rows[i]["task_id"], r.status, r.stderr[-300:]) for i, r in enumerate(passed) if not r.passed]
    assert not broken and len(passed) == len(rows) and len(rows) in (13, 164)
    assert not any(failed)


# ----------------------------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run dir in the driver's layout (RUN/checkpoint) with a tiny random model and its tokenizer."""
    tok = small_tokenizer()
    root = tmp_path_factory.mktemp("run")
    save(tiny_model(tok.vocab_size, seed=7), root / "checkpoint", tokenizer=tok)
    return root


def test_fastsft_eval_prints_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = main(["eval", "--checkpoint", str(run_dir), "-a", "spell,synthetic:arithmetic@test?size=4",
               "--max-problems", "2", "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert re.search(r"^spell\s+\d\.\d{4}", printed, re.M) and "ChatCORE" in printed
    record = json.loads(out.read_text())
    assert record["checkpoint"] == str(run_dir / "checkpoint")
    assert record["metrics"]["spell/problems"] == 2 and "chatcore" in record["metrics"]


def test_fastsft_eval_names_a_bad_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path), "-a", "spell"]) == 2
    assert "neither a fastsft checkpoint" in capsys.readouterr().err


def test_fastsft_chat_answers_once(run_dir, capsys):
    assert main(["chat", "--checkpoint", str(run_dir), "-p", "How many apples?", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_streams_tool_calls_and_keeps_them_in_the_conversation():
    tok = small_tokenizer()
    engine = Engine(ScriptedModel(tool_script(tok), tok.vocab_size, 0), tok)
    stream = io.StringIO()
    parts = reply(engine, [{"role": "user", "content": "How many?"}], max_new_tokens=100, temperature=0.0,
                  top_k=None, seed=0, stream=stream)
    assert stream.getvalue() == "Mia has [calculator: 12*7 = 84] apples.\n#### 84\n"
    assert parts == [{"type": "text", "text": "Mia has "}, {"type": "python", "text": "12*7"},
                     {"type": "python_output", "text": "84"}, {"type": "text", "text": " apples.\n#### 84"}]


def test_interactive_chat_keeps_the_turns(run_dir):
    from fastsft.chat_cli import chat

    lines = iter(["hello", "how many apples?", ""])
    stream = io.StringIO()
    assert chat(run_dir, read_line=lambda prompt: next(lines), max_new_tokens=4, device="cpu", stream=stream) == 0
    assert stream.getvalue().count("assistant> ") == 2


def test_tokenizer_of_the_run_dir_is_used_when_the_checkpoint_has_none(tmp_path):
    from fastsft.eval import load_for_inference

    tok = small_tokenizer()
    save(tiny_model(tok.vocab_size), tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_for_inference(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    model, loaded, directory = load_for_inference(tmp_path)
    assert directory == tmp_path / "checkpoint" and loaded.vocab_size == tok.vocab_size and not model.training
