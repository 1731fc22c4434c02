"""`fastsft chat`: talk to a checkpoint in the terminal, tokens streamed as they come, calculator calls shown.

Each reply goes back into the conversation as the assistant's parts (text, python, python_output), so the next
turn is rendered exactly as training rendered multi-turn conversations.
"""

from __future__ import annotations

import sys

import torch

from fastsft.chat import render_for_completion
from fastsft.engine import Engine
from fastsft.eval.loading import load_for_inference


class _Reply:
    """Streams one reply: ordinary tokens printed as their text grows, tool calls bracketed, parts collected."""

    def __init__(self, engine: Engine, stream):
        self.engine, self.stream = engine, stream
        self.parts: list[dict] = []
        self.kind, self.tokens, self.printed = "text", [], 0

    def _flush_text(self) -> str:
        text = self.engine.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its next token
            self.stream.write(text[self.printed:])
            self.stream.flush()
            self.printed = len(text)
        return text

    def _close(self) -> None:
        text = self._flush_text()
        if self.tokens:
            self.parts.append({"type": self.kind, "text": text})
        self.tokens, self.printed = [], 0

    def add(self, token: int) -> None:
        e = self.engine
        if token in (e.python_start, e.python_end, e.output_start, e.output_end) or token in e.stop_ids:
            self._close()
            if token == e.python_start:
                self.kind = "python"
                self.stream.write("[calculator: ")
            elif token == e.python_end:
                self.kind = "text"
            elif token == e.output_start:
                self.kind = "python_output"
                self.stream.write(" = ")
            elif token == e.output_end:
                self.kind = "text"
                self.stream.write("]")
            self.stream.flush()
            return
        if token in e.special_ids:
            return  # another special inside a reply (a confused model): not text, not shown
        self.tokens.append(token)
        self._flush_text()


def reply(engine: Engine, messages: list[dict], *, max_new_tokens: int, temperature: float, top_k: int | None,
          seed: int, stream) -> list[dict]:
    """Generate and stream the assistant's reply to `messages`; returns its parts."""
    prompt = render_for_completion(engine.tokenizer, {"messages": messages})
    out = _Reply(engine, stream)
    for step in engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                seed=seed):
        out.add(step.tokens[0])
    out._close()
    stream.write("\n")
    stream.flush()
    return out.parts or [{"type": "text", "text": ""}]


def chat(checkpoint, prompt: str | None = None, *, max_new_tokens: int = 512, temperature: float = 0.6,
         top_k: int | None = 50, seed: int = 0, device: str | None = None, stream=None, read_line=input) -> int:
    """One answer to `prompt`, or (without it) a conversation until an empty line, 'quit' or end of input."""
    stream = stream or sys.stdout
    top_k = top_k or None  # 0 on the command line: no top-k filter
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, directory = load_for_inference(checkpoint, device=device)
    engine = Engine(model, tokenizer)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, stream=stream)
    if prompt is not None:
        reply(engine, [{"role": "user", "content": prompt}], seed=seed, **options)
        return 0
    stream.write(f"fastsft chat with {directory} (empty line or 'quit' ends)\n")
    messages: list[dict] = []
    turn = 0
    while True:
        try:
            text = read_line("you> ")
        except EOFError:
            break
        if not text.strip() or text.strip().lower() in ("quit", "exit"):
            break
        messages.append({"role": "user", "content": text})
        stream.write("assistant> ")
        parts = reply(engine, messages, seed=seed + turn, **options)
        messages.append({"role": "assistant", "content": parts})
        turn += 1
    return 0
