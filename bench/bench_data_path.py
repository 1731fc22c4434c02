"""Data path benchmark: C++ render + pack against the plain-Python reference render + pack, same conversations.

Run: python -m pytest bench/bench_data_path.py --benchmark-only -s
(not part of the test suite: testpaths is tests/). BPE encoding is excluded from both timings: the conversations
are SmolTalk-like synthetic ones (1-3 turns, mean ~900 tokens, ~66% supervised) whose text spans are looked up
in a table of pre-tokenized ids by a stand-in tokenizer, so both paths pay the same, near-zero, encoding cost.
"""

import time

import numpy as np
import pytest

from fastsft.chat import render_conversation
from fastsft.packing import default_max_seqs, pack_rows, pack_rows_reference, render_batch_flat, segment_budget
from fastsft.tokenizer import SPECIAL_TOKENS

NUM_CONVERSATIONS = 512
SEQ_LEN = 2048
BASE_VOCAB = 32768
RESULTS: dict[str, float] = {}


class PretokenizedTokenizer:
    """Tokenizer interface over a {text: ids} table: encode is a lookup, so no BPE time is measured."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table
        self.special = {name: BASE_VOCAB + k for k, name in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self.special["<|bos|>"]
        self.vocab_size = BASE_VOCAB + len(SPECIAL_TOKENS)

    def encode(self, text):
        return self.table[text]

    def encode_batch(self, texts):
        return [self.table[t] for t in texts]

    def encode_special(self, name):
        return self.special[name]


def smoltalk_like(seed: int = 0, n: int = NUM_CONVERSATIONS):
    """Conversations of 1-3 turns; user spans ~140 tokens, assistant ~300 (lognormal); 10% with a tool call."""
    rng = np.random.default_rng(seed)
    table: dict[str, list[int]] = {}

    def span(mean: float) -> str:
        length = int(min(2000, rng.lognormal(np.log(mean) - 0.5, 1.0)))
        text = f"span-{len(table)}"
        table[text] = rng.integers(0, BASE_VOCAB, size=length).tolist()
        return text

    conversations = []
    for _ in range(n):
        messages = []
        for _ in range(int(rng.integers(1, 4))):
            messages.append({"role": "user", "content": span(140)})
            if rng.random() < 0.1:
                content = [{"type": "text", "text": span(100)}, {"type": "python", "text": span(40)},
                           {"type": "python_output", "text": span(20)}, {"type": "text", "text": span(150)}]
            else:
                content = span(300)
            messages.append({"role": "assistant", "content": content})
        conversations.append({"messages": messages})
    return PretokenizedTokenizer(table), conversations


@pytest.fixture(scope="module")
def data():
    return smoltalk_like()


def python_path(tokenizer, conversations):
    rendered = [render_conversation(tokenizer, c, max_tokens=SEQ_LEN) for c in conversations]
    return pack_rows_reference(rendered, SEQ_LEN, pad_id=tokenizer.bos_id)


def cpp_path(tokenizer, conversations):
    return pack_rows(render_batch_flat(tokenizer, conversations, max_tokens=SEQ_LEN), SEQ_LEN,
                     pad_id=tokenizer.bos_id)


def test_python_reference_render_pack(benchmark, data):
    tokenizer, conversations = data
    packed = benchmark.pedantic(python_path, args=(tokenizer, conversations), rounds=5, iterations=1)
    RESULTS["python"] = benchmark.stats.stats.min
    RESULTS["python_median"] = benchmark.stats.stats.median


def test_cpp_render_pack(benchmark, data):
    tokenizer, conversations = data
    packed = benchmark(cpp_path, tokenizer, conversations)
    RESULTS["cpp"] = benchmark.stats.stats.min
    RESULTS["cpp_median"] = benchmark.stats.stats.median
    reference = python_path(tokenizer, conversations)
    assert np.array_equal(packed.input_ids, reference.input_ids)
    assert np.array_equal(packed.targets, reference.targets)
    tokens = packed.num_tokens
    benchmark.extra_info.update(
        conversations=len(conversations), tokens=tokens, mean_tokens=tokens / len(conversations),
        supervised_ratio=packed.num_supervised / tokens, rows=packed.rows, efficiency=packed.efficiency,
    )
    line = (f"\n{len(conversations)} conversations, {tokens} tokens (mean {tokens / len(conversations):.0f}), "
            f"supervised {packed.num_supervised / tokens:.1%}; rows of {SEQ_LEN}: {packed.rows}, "
            f"efficiency {packed.efficiency:.3f}; C++ min {RESULTS['cpp'] * 1e3:.2f} ms, "
            f"median {RESULTS['cpp_median'] * 1e3:.2f} ms")
    if "python" in RESULTS:  # minimum over rounds: the estimate least disturbed by other load on the machine
        benchmark.extra_info["speedup_min_vs_python"] = RESULTS["python"] / RESULTS["cpp"]
        benchmark.extra_info["speedup_median_vs_python"] = RESULTS["python_median"] / RESULTS["cpp_median"]
        line += (f"; Python min {RESULTS['python'] * 1e3:.0f} ms, median {RESULTS['python_median'] * 1e3:.0f} ms; "
                 f"speedup {RESULTS['python'] / RESULTS['cpp']:.1f}x (min), "
                 f"{RESULTS['python_median'] / RESULTS['cpp_median']:.1f}x (median)")
    print(line)


def test_speedup_interleaved(benchmark, data):
    """The ratio, robust to other load on a shared machine: each Python run is paired with C++ runs made right
    after it (best of 5), and the median of the pair ratios is reported."""
    tokenizer, conversations = data

    def pairs(n_pairs=5):
        ratios = []
        for _ in range(n_pairs):
            start = time.perf_counter()
            python_path(tokenizer, conversations)
            python_s = time.perf_counter() - start
            cpp_s = []
            for _ in range(5):
                start = time.perf_counter()
                cpp_path(tokenizer, conversations)
                cpp_s.append(time.perf_counter() - start)
            ratios.append((python_s / min(cpp_s), python_s, min(cpp_s)))
        return sorted(ratios)

    ratios = benchmark.pedantic(pairs, rounds=1, iterations=1)
    ratio, python_s, cpp_s = ratios[len(ratios) // 2]
    benchmark.extra_info.update(speedup_interleaved_median=ratio, pair_ratios=[r for r, _, _ in ratios])
    print(f"\ninterleaved pairs: speedup median {ratio:.1f}x (Python {python_s * 1e3:.0f} ms vs C++ "
          f"{cpp_s * 1e3:.2f} ms in that pair); all pairs: {', '.join(f'{r:.1f}x' for r, _, _ in ratios)}")


@pytest.mark.parametrize("budget", ["default", "segment_budget"])
def test_streaming_efficiency_fixed_rows(benchmark, data, budget):
    """A loader's view: 16 rows of 2048 per step, left-overs carried into the next step's buffer; cu_seqlens at
    the default budget (66 segments per row) or sized to the data (segment_budget over the rendered lengths)."""
    tokenizer, conversations = data
    flat = render_batch_flat(tokenizer, conversations, max_tokens=SEQ_LEN)
    pairs = flat.to_list()
    max_seqs = (default_max_seqs(16, SEQ_LEN) if budget == "default"
                else segment_budget(np.diff(flat.offsets), 16, SEQ_LEN))

    def stream():
        source = iter(range(len(pairs)))
        buffer: list[int] = []
        efficiencies = []
        while True:
            while len(buffer) < 64 and (i := next(source, None)) is not None:  # keep 64 conversations buffered
                buffer.append(i)
            if not buffer:
                return len(efficiencies), efficiencies
            packed = pack_rows([pairs[i] for i in buffer], SEQ_LEN, num_rows=16, pad_id=tokenizer.bos_id,
                               max_seqs=max_seqs)
            buffer = [buffer[k] for k in packed.leftover]
            efficiencies.append(packed.efficiency)

    steps, efficiencies = benchmark.pedantic(stream, rounds=1, iterations=1)
    full = efficiencies[:-2] or efficiencies  # the last steps drain the buffer and are partly empty
    benchmark.extra_info.update(steps=steps, mean_efficiency_full_steps=float(np.mean(full)), max_seqs=max_seqs)
    print(f"\nstreaming 16x{SEQ_LEN} rows, buffer 64, {max_seqs} segments ({budget}): {steps} steps, mean "
          f"efficiency {np.mean(full):.3f} (excluding the 2 draining steps)")


@pytest.mark.parametrize("budget", ["segment_budget", "default"])
def test_training_stream_batch(benchmark, data, budget):
    """What the loader thread spends a batch: fastsft.batches.PackedStream's next_batch, 32 rows of 2048 (d12's
    micro-batch) from its pool of 8x the segment budget, left-overs carried. This runs beside the training loop and
    holds the GIL where it is Python, so it must stay a small part of a step's host time. On our CPU: 0.52 ms
    (budget 128, sized to the data) and 0.66 ms (the default budget), where flattening the whole pool every batch
    took 4.3 and 79 ms (bench/RESULTS.md, run 13)."""
    from fastsft.batches import PackedStream, RenderedSource

    tokenizer, conversations = data
    flat = render_batch_flat(tokenizer, conversations, max_tokens=SEQ_LEN + 1)
    source = RenderedSource(flat.to_list() * 40)  # 20,480 conversations: the pool never drains during the rounds
    rows = 32
    max_seqs = (default_max_seqs(rows, SEQ_LEN) if budget == "default"
                else segment_budget(np.diff(flat.offsets), rows, SEQ_LEN))
    stream = PackedStream(source, rows, SEQ_LEN, max_seqs, pad_id=tokenizer.bos_id)
    for _ in range(3):  # fill the pool first: its first batches render it
        stream.next_batch()
    batch = benchmark.pedantic(stream.next_batch, rounds=15, iterations=1)
    assert batch.packed.num_tokens > 0 and len(stream.pending) > len(batch.lengths)
    benchmark.extra_info.update(max_seqs=max_seqs, pool=len(stream.pending), placed=len(batch.lengths))
    print(f"\ntraining stream, {rows}x{SEQ_LEN}, budget {max_seqs} ({budget}), pool {len(stream.pending)}: "
          f"median {benchmark.stats.stats.median * 1e3:.2f} ms a batch, {len(batch.lengths)} conversations placed")
