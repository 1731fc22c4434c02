"""The generation engine (KV cache, sampling, stops, tool forcing) and the calculator."""

import time

import pytest
import torch

from eval_helpers import ScriptedModel, small_tokenizer, tiny_model
from fastsft.chat import render_for_completion
from fastsft.engine import Engine, calculator

# ----------------------------------------------------------------------------------------------------------------
# calculator


@pytest.mark.parametrize("text, expected", [
    ("12*7", "84"), ("48/2", "24"), ("10/4", "2.5"), ("1/3", "0.333333"), ("7//2", "3"), ("7 % 3", "1"),
    ("-(3+4)*2", "-14"), ("2**10", "1024"), ("1,200*3", "3600"), (" 3.5 + 1.5 ", "5"),
    ("'strawberry'.count('r')", "3"), ("len('hello')", "5"), ('"banana".count("a")', "3"),
])
def test_calculator_evaluates_arithmetic_and_string_ops(text, expected):
    assert calculator(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("__import__('os').system('ls')", "not allowed"),
    ("import os", "cannot evaluate"),
    ("x + 1", "Name is not allowed"),
    ("(1).__class__", "Attribute is not allowed"),
    ("().__class__.__bases__[0]", "not allowed"),
    ("open('f')", "call of open"),
    ("'ab'.join(['a'])", "not allowed"),
    ("[x for x in range(10**9)]", "not allowed"),
    ("for i in range(10**9): pass", "cannot evaluate"),
    ("9**9**9", "exponent"),
    ("2**100000", "exponent"),
    ("10**99 * 10**99", "more than 100 digits"),
    ("1" * 40, "digits"),
    ("1+" * 150 + "1", "longer than"),
    ("'a' * 10**9", "strings"),
    ("1/0", "division by zero"),
    ("lambda: 1", "not allowed"),
    ("", "empty"),
])
def test_calculator_refuses_quickly_with_an_error_string(text, reason):
    start = time.perf_counter()
    out = calculator(text)
    assert time.perf_counter() - start < 0.5
    assert out.startswith("Error:") and reason in out, out


def test_calculator_never_raises_on_odd_input():
    for text in (None, 12, "(" * 500, ")", "'unterminated", "1e308*1e308", "'abc'.index('z')"):
        assert calculator(text).startswith("Error:")


# ----------------------------------------------------------------------------------------------------------------
# engine on a tiny random model


def uncached_greedy(model, tokenizer, prompt, max_new_tokens):
    """Reference decoding: the whole sequence through the model each step, no cache; same stop and tool rules.
    The input is right-padded to one fixed length (a causal model's logits at t ignore later tokens), so the CPU
    backend does not build kernels for a new shape every step."""
    special = tokenizer.encode_special
    stops = {special("<|assistant_end|>"), tokenizer.bos_id}
    ids, out, forced, python = list(prompt), [], [], None
    width = len(prompt) + max_new_tokens
    while len(out) < max_new_tokens:
        with torch.no_grad():
            padded = torch.tensor([ids + [0] * (width - len(ids))])
            token = int(model(padded)[0, len(ids) - 1].argmax())
        if forced:
            token = forced.pop(0)
        ids.append(token)
        out.append(token)
        if token in stops:
            break
        if token == special("<|python_start|>"):
            python = []
        elif token == special("<|python_end|>") and python is not None:
            result = calculator(tokenizer.decode([t for t in python if t < tokenizer.vocab_size - 9]))
            forced = [special("<|output_start|>"), *tokenizer.encode(result), special("<|output_end|>")]
            python = None
        elif python is not None:
            python.append(token)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_equals_uncached_decoding(seed):
    tokenizer = small_tokenizer()
    model = tiny_model(tokenizer.vocab_size, seed=seed)
    prompt = render_for_completion(tokenizer, {"messages": [{"role": "user", "content": f"How many apples? {seed}"}]})
    engine = Engine(model, tokenizer)
    got = engine.generate_batch(prompt, num_samples=2, max_new_tokens=24)
    expected = uncached_greedy(model, tokenizer, prompt, 24)
    assert got[0].tokens == expected and got[1].tokens == expected
    assert got[0].stopped == (expected[-1] in engine.stop_ids)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    tokenizer = small_tokenizer()
    model = tiny_model(tokenizer.vocab_size, seed=3)
    prompt = render_for_completion(tokenizer, {"messages": [{"role": "user", "content": "Spell the word: apple"}]})
    engine = Engine(model, tokenizer)
    a = engine.generate_batch(prompt, num_samples=4, max_new_tokens=16, temperature=1.0, seed=5)
    b = engine.generate_batch(prompt, num_samples=4, max_new_tokens=16, temperature=1.0, seed=5)
    c = engine.generate_batch(prompt, num_samples=4, max_new_tokens=16, temperature=1.0, seed=6)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    assert len({tuple(g.tokens) for g in a}) > 1  # the rows sample independently
    greedy = engine.generate_batch(prompt, max_new_tokens=16)
    top1 = engine.generate_batch(prompt, max_new_tokens=16, temperature=1.5, top_k=1, seed=7)
    assert top1[0].tokens == greedy[0].tokens


def scripted(tokenizer, answer_tokens):
    return ScriptedModel(answer_tokens, tokenizer.vocab_size, tokenizer.encode_special("<|assistant_end|>"))


def test_tool_call_is_executed_and_its_output_forced():
    tok = small_tokenizer()
    sp = tok.encode_special
    expression = tok.encode("12*7")
    forced = [sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>")]
    wrong = tok.encode("9")[0]  # what the model says while the tool output is forced: must be overridden
    head = tok.encode("Mia has ") + [sp("<|python_start|>"), *expression, sp("<|python_end|>")]
    tail = tok.encode(" apples.\n#### 84") + [sp("<|assistant_end|>")]
    model = scripted(tok, head + [wrong] * len(forced) + tail)
    engine = Engine(model, tok)
    steps = list(engine.generate([tok.bos_id] * 5, max_new_tokens=64))
    tokens = [s.tokens[0] for s in steps]
    assert tokens == head + forced + tail
    assert [s.forced[0] for s in steps] == [False] * len(head) + [True] * len(forced) + [False] * len(tail)
    gen = engine.finish(tokens)
    assert gen.stopped and gen.tool_calls == [("12*7", "84")]
    assert gen.text == "Mia has 12*784 apples.\n#### 84"
    # The forced tokens went into the cache (fed back), not the model's own choice.
    fed = [column[0] for column in model.fed[1:]]
    assert fed == tokens[:-1]


def test_tool_errors_are_injected_as_text():
    tok = small_tokenizer()
    sp = tok.encode_special
    head = [sp("<|python_start|>"), *tok.encode("x+1"), sp("<|python_end|>")]
    model = scripted(tok, head + [tok.encode("9")[0]] * 30)
    gen = Engine(model, tok).generate_batch([tok.bos_id] * 5, max_new_tokens=40)[0]
    assert gen.tool_calls == [("x+1", "Error: Name is not allowed")]
    assert gen.tokens[len(head)] == sp("<|output_start|>")


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_rows_stop_at_end_tokens(stop):
    tok = small_tokenizer()
    stop_id = tok.encode_special(stop)
    model = scripted(tok, tok.encode("#### 3") + [stop_id] + tok.encode("never said"))
    gen = Engine(model, tok).generate_batch([tok.bos_id] * 5, num_samples=3, max_new_tokens=50)
    for g in gen:
        assert g.stopped and g.tokens[-1] == stop_id and g.text == "#### 3"
        assert g.finished == (stop == "<|assistant_end|>")


def test_budget_ends_a_row_that_never_stops():
    tok = small_tokenizer()
    model = scripted(tok, tok.encode("a") * 100)
    gen = Engine(model, tok).generate_batch([tok.bos_id] * 5, max_new_tokens=7)[0]
    assert not gen.stopped and gen.num_tokens == 7


def test_bad_generate_arguments_raise():
    tok = small_tokenizer()
    engine = Engine(tiny_model(tok.vocab_size), tok)
    with pytest.raises(ValueError, match="prompt is empty"):
        list(engine.generate([]))
    with pytest.raises(ValueError, match="num_samples"):
        list(engine.generate([tok.bos_id], num_samples=0))
    with pytest.raises(ValueError, match="temperature"):
        list(engine.generate([tok.bos_id], temperature=-1.0))
