"""Generation: batched sampling over the model's KV cache, with the calculator tool between python tokens.

Why one engine: evaluation (fastsft.eval) and `fastsft chat` generate through it, with the same stops and the same
tool forcing, so a metric measures what a user of the model sees.

    engine = Engine(model, tokenizer)
    for step in engine.generate(prompt_ids, num_samples=4, max_new_tokens=256, temperature=0.8, seed=0):
        step.tokens, step.forced      # one token per row, and whether the tool (not the model) chose it
    engine.generate_batch(prompt_ids, ...) -> list[Generation]   # the finished rows, tokens and text

The prompt is prefilled once into a one-row cache, which `KVCache.repeat` copies for the samples. Each step feeds
the last token of every row and samples the next (argmax at temperature 0; else softmax of logits / temperature,
optionally over the top-k, from a seeded generator). A row ends at `<|assistant_end|>` or `<|bos|>` (it "stopped")
or when it has `max_new_tokens` tokens (it ran out of budget); the batch ends when every row has.

Tool use: the tokens a row writes between `<|python_start|>` and `<|python_end|>` are decoded and given to
`calculator`; its result is then forced into that row as `<|output_start|> result <|output_end|>`, one token per
step (the model's own choice at those steps is discarded), before sampling resumes. Forced tokens count toward
the budget, as they take cache room like any other.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fastsft.model import KVCache
from fastsft.tokenizer import SPECIAL_TOKENS

# --- the calculator ------------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_NUMBER_DIGITS = 30  # of a literal
MAX_RESULT_DIGITS = 100  # of any intermediate integer: keeps every operation small and fast
MAX_EXPONENT = 1000
MAX_STRING_CHARS = 1000
TIME_LIMIT_S = 0.1

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_STRING_METHODS = {"count": str.count, "upper": str.upper, "lower": str.lower, "strip": str.strip,
                   "index": str.index, "find": str.find, "startswith": str.startswith, "endswith": str.endswith}


class CalculatorRefusal(ValueError):
    """An expression the calculator will not evaluate; its message is the tool output."""


class _Evaluator:
    """Walks an expression's AST, allowing only numbers, + - * / // % **, unary +/-, parentheses, and a few
    operations on string literals ('word'.count('r'), len('word')). Everything else is refused by name."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def visit(self, node: ast.AST):
        if time.perf_counter() > self.deadline:
            raise CalculatorRefusal("took too long")
        if isinstance(node, ast.Expression):
            return self.visit(node.body)
        if isinstance(node, ast.Constant):
            return self.constant(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self.number(_UNARY[type(node.op)](self.expect_number(self.visit(node.operand))))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left = self.expect_number(self.visit(node.left))
            right = self.expect_number(self.visit(node.right))
            if isinstance(node.op, ast.Pow):
                self.check_power(left, right)
            try:
                return self.number(_BINARY[type(node.op)](left, right))
            except ZeroDivisionError:
                raise CalculatorRefusal("division by zero") from None
            except OverflowError:
                raise CalculatorRefusal("number too large") from None
        if isinstance(node, ast.Call):
            return self.call(node)
        raise CalculatorRefusal(f"{type(node).__name__} is not allowed")

    def constant(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise CalculatorRefusal(f"constant {value!r} is not allowed")
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise CalculatorRefusal("string too long")
            return value
        if isinstance(value, int) and abs(value) >= 10**MAX_NUMBER_DIGITS:
            raise CalculatorRefusal(f"number with more than {MAX_NUMBER_DIGITS} digits")
        return value

    @staticmethod
    def expect_number(value):
        if isinstance(value, str):
            raise CalculatorRefusal("arithmetic on strings is not allowed")
        return value

    @staticmethod
    def number(value):
        if isinstance(value, int) and value.bit_length() > MAX_RESULT_DIGITS * 3.33:
            raise CalculatorRefusal(f"result with more than {MAX_RESULT_DIGITS} digits")
        if isinstance(value, complex):
            raise CalculatorRefusal("complex result")
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorRefusal("result is not a finite number")
        return value

    @staticmethod
    def check_power(base, exponent):
        # Refused before computing: 9**9**9 must not run for minutes. |base| <= 1 never grows.
        if abs(exponent) > MAX_EXPONENT:
            raise CalculatorRefusal(f"exponent {exponent} is larger than {MAX_EXPONENT}")
        if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > MAX_RESULT_DIGITS:
            raise CalculatorRefusal(f"result with more than {MAX_RESULT_DIGITS} digits")

    def call(self, node: ast.Call):
        if node.keywords:
            raise CalculatorRefusal("keyword arguments are not allowed")
        args = [self.visit(arg) for arg in node.args]
        func = node.func
        if isinstance(func, ast.Name) and func.id == "len" and len(args) == 1 and isinstance(args[0], str):
            return len(args[0])
        if isinstance(func, ast.Attribute) and func.attr in _STRING_METHODS:
            target = self.visit(func.value)
            if isinstance(target, str) and all(isinstance(a, str) for a in args) and len(args) <= 1:
                try:
                    return _STRING_METHODS[func.attr](target, *args)
                except ValueError as e:  # 'abc'.index('z')
                    raise CalculatorRefusal(str(e)) from None
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", type(func).__name__)
        raise CalculatorRefusal(f"call of {name} is not allowed")


def format_result(value) -> str:
    """72.0 -> '72' (the training data's results are integers where they can be), 1/3 -> '0.333333'."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6f}".rstrip("0").rstrip(".") if abs(value) >= 1e-6 else repr(value)
    return str(value)


def calculator(text: str) -> str:
    """The tool output for the code between <|python_start|> and <|python_end|>: its value as text, or a string
    starting with 'Error:'. Parses with `ast` and evaluates an allow-list; never eval, never raises."""
    try:
        if not isinstance(text, str):
            return f"Error: expected text, got {type(text).__name__}"
        expr = text.strip()
        if not expr:
            return "Error: empty expression"
        if len(expr) > MAX_EXPRESSION_CHARS:
            return f"Error: expression longer than {MAX_EXPRESSION_CHARS} characters"
        if "'" not in expr and '"' not in expr:
            expr = expr.replace(",", "")  # thousands separators, as in "1,200*3"
        tree = ast.parse(expr, mode="eval")
        return format_result(_Evaluator(time.perf_counter() + TIME_LIMIT_S).visit(tree))
    except CalculatorRefusal as e:
        return f"Error: {e}"
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as e:
        return f"Error: cannot evaluate ({type(e).__name__})"


# --- the engine ----------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One generation step: the token of every row (B,), and whether the tool forced it (not the model)."""

    tokens: list[int]
    forced: list[bool]
    done: list[bool]  # rows that had already finished before this step (their token is filler)


@dataclass
class Generation:
    """One finished row: the generated tokens (prompt excluded, final stop token included)."""

    tokens: list[int]
    text: str  # the answer text: ordinary tokens decoded, the special tokens left out
    stopped: bool  # ended with <|assistant_end|> or <|bos|> within the budget
    finished: bool = False  # ended with <|assistant_end|>: the reply closed as trained (what stop_rate counts)
    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (expression, tool output)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


class _Row:
    """Per-row decoding state: finished or not, the python expression being written, the forced tokens to come."""

    def __init__(self):
        self.tokens: list[int] = []
        self.forced: deque[int] = deque()
        self.python: list[int] | None = None  # token ids since <|python_start|>, None outside a call
        self.done = False
        self.stopped = False
        self.tool_calls: list[tuple[str, str]] = []


class Engine:
    """Generates assistant replies from a GPT and a fastsft Tokenizer, with the calculator tool."""

    def __init__(self, model, tokenizer, tool=calculator):
        self.model = model
        self.tokenizer = tokenizer
        self.tool = tool
        special = tokenizer.encode_special
        self.assistant_end = special("<|assistant_end|>")
        self.stop_ids = {self.assistant_end, tokenizer.bos_id}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.special_ids = {special(name) for name in SPECIAL_TOKENS}

    def _device(self):
        return next(self.model.parameters()).device

    def _sample(self, logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        """logits (B, V) fp32 -> (B,) int64."""
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], *, num_samples: int = 1, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> Iterator[Step]:
        """Yield one Step per generated position until every row is done (see the module docstring)."""
        if not prompt_ids:
            raise ValueError("Engine.generate: the prompt is empty (it should start with <|bos|>)")
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"Engine.generate: num_samples and max_new_tokens must be >= 1, "
                             f"got {num_samples}, {max_new_tokens}")
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"Engine.generate: temperature must be >= 0 and top_k >= 1, got {temperature}, {top_k}")
        model, device = self.model, self._device()
        dtype = next(model.parameters()).dtype
        capacity = len(prompt_ids) + max_new_tokens
        generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

        prefill = KVCache(model.config, 1, capacity, device=device, dtype=dtype)
        logits = model(torch.tensor([prompt_ids], dtype=torch.long, device=device), kv_cache=prefill)[:, -1]
        cache = prefill.repeat(num_samples) if num_samples > 1 else prefill
        logits = logits.expand(num_samples, -1)  # (B, V)
        rows = [_Row() for _ in range(num_samples)]
        for _ in range(max_new_tokens):
            sampled = self._sample(logits, temperature, top_k, generator).tolist()  # (B,)
            step = Step(tokens=[], forced=[], done=[row.done for row in rows])
            for row, token in zip(rows, sampled):
                forced = bool(row.forced) and not row.done
                if forced:
                    token = row.forced.popleft()
                elif row.done:
                    token = self.tokenizer.bos_id  # filler for finished rows; never read
                step.tokens.append(token)
                step.forced.append(forced)
                if not row.done:
                    self._advance(row, token, max_new_tokens)
            yield step
            if all(row.done for row in rows):
                return
            logits = model(torch.tensor(step.tokens, dtype=torch.long, device=device)[:, None],
                           kv_cache=cache)[:, -1]

    def _advance(self, row: _Row, token: int, budget: int) -> None:
        row.tokens.append(token)
        if token in self.stop_ids:
            row.done = row.stopped = True
            return
        if token == self.python_start:
            row.python = []
        elif token == self.python_end and row.python is not None:
            expression = self.tokenizer.decode([t for t in row.python if t not in self.special_ids])
            result = self.tool(expression)
            row.tool_calls.append((expression, result))
            row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.python = None
        elif row.python is not None:
            row.python.append(token)
        if len(row.tokens) >= budget:
            row.done = True

    def generate_batch(self, prompt_ids: list[int], **kwargs) -> list[Generation]:
        """Run generate() to the end and return each row as a Generation."""
        tokens: list[list[int]] | None = None
        for step in self.generate(prompt_ids, **kwargs):
            if tokens is None:
                tokens = [[] for _ in step.tokens]
            for row, (token, done) in enumerate(zip(step.tokens, step.done)):
                if not done:
                    tokens[row].append(token)
        return [self.finish(row_tokens) for row_tokens in tokens or []]

    def finish(self, tokens: list[int]) -> Generation:
        """The Generation of one row's tokens: text without specials, whether it stopped, its tool calls."""
        stopped = bool(tokens) and tokens[-1] in self.stop_ids
        text = self.tokenizer.decode([t for t in tokens if t not in self.special_ids])
        calls, python, output = [], None, None
        for token in tokens:  # re-read the tool calls from the tokens, so any token list can be finished
            if token == self.python_start:
                python = []
            elif token == self.python_end and python is not None:
                calls.append([self.tokenizer.decode(python), None])
                python = None
            elif token == self.output_start:
                output = []
            elif token == self.output_end and output is not None:
                if calls and calls[-1][1] is None:
                    calls[-1][1] = self.tokenizer.decode(output)
                output = None
            elif python is not None:
                python.append(token)
            elif output is not None:
                output.append(token)
        return Generation(tokens=list(tokens), text=text, stopped=stopped,
                          finished=stopped and tokens[-1] == self.assistant_end,
                          tool_calls=[(expr, out if out is not None else "") for expr, out in calls])

