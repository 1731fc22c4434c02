"""The C++ boundary under hostile callers: each case once crashed (segfault, heap overflow or a read of freed
memory), so each runs in its own process and the test checks the exit status before the output.

What makes them safe (csrc/array_checks.h): every array is copied into owned memory before it is checked and
before the GIL is released; flatten_token_lists reads each list once and re-reads sizes and items after any
Python code (an id's __index__) has run.
"""

import subprocess
import sys
import textwrap

import pytest


def run_isolated(script: str, timeout: int = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit status {proc.returncode} (negative = killed by signal)\n{proc.stderr[-2000:]}"
    return proc.stdout


def flatten_with_hostile_id(hostile: str, lists: str, show: str = "tokens.tolist(), offsets.tolist()") -> str:
    """flatten_token_lists over `lists` (source) whose first id is an instance of `hostile` (the source of a class
    Hostile whose __init__ takes the lists), in its own process; returns what `show` printed."""
    return run_isolated("from fastsft import _C\n" + textwrap.dedent(hostile) + f"""
lists = {lists}
lists[0][0] = Hostile(lists)
tokens, offsets = _C.flatten_token_lists(lists)
print({show})
""")


def test_flatten_when_index_grows_a_later_list():
    # Sizes read before __index__ ran used to size the output: the grown list overflowed the heap buffer.
    out = flatten_with_hostile_id("""
        class Hostile:
            def __init__(self, lists): self.lists = lists
            def __index__(self):
                self.lists[1].extend([7] * 100_000)
                return 1
    """, "[[0, 0], [1, 2]]", show="tokens[:5].tolist(), len(tokens), offsets.tolist()")
    assert out.split("\n")[0] == "[1, 0, 1, 2, 7] 100004 [0, 2, 100004]"


def test_flatten_when_index_empties_the_list_being_read():
    # The item pointer of the list being read went stale (freed) when __index__ emptied that very list.
    out = flatten_with_hostile_id("""
        class Hostile:
            def __init__(self, lists): self.lists = lists
            def __index__(self):
                del self.lists[0][:]
                self.lists.clear()
                return 3
    """, "[[0] + list(range(200_000)), [5, 6]]")
    # The outer list was snapshotted, the span is read once: what was there when each item was reached.
    assert out.strip() == "[3, 5, 6] [0, 1, 3]"


def test_flatten_when_an_id_dies_and_its_finalizer_empties_the_list():
    # __index__ drops the list's reference, so the extension's hold is the last: releasing it runs __del__ (Python
    # code) after the conversion, which must not leave a stale view of the list behind.
    out = flatten_with_hostile_id("""
        class Hostile:
            def __init__(self, lists): self.lists = lists
            def __index__(self):
                del self.lists[0][0]
                return 3
            def __del__(self):
                self.lists[0].clear()
    """, "[[0] + list(range(200_000)), [5]]")
    assert out.strip() == "[3, 5] [0, 1, 2]"


def test_flatten_rejects_what_is_not_a_token_id():
    out = run_isolated("""
        from fastsft import _C
        for bad in ([[1, "2"]], [[1, 2**40]], [[1, 2**80]], [[-1]], "abc", 5):
            try:
                _C.flatten_token_lists(bad)
            except (TypeError, ValueError) as e:
                print(type(e).__name__, e)
    """)
    lines = out.strip().split("\n")
    assert lines[0] == "TypeError flatten_token_lists: span 0 position 1 holds a str, not an int token id"
    assert "span 0 position 1 holds token id 1099511627776, outside [0, 2^31)" in lines[1]
    assert "span 0 position 1 holds a token id outside [0, 2^31)" in lines[2]
    assert "span 0 position 0 holds token id -1" in lines[3]
    assert lines[4].startswith("TypeError") and lines[5].startswith("TypeError") and len(lines) == 6


MUTATOR = """
    import threading
    import numpy as np
    from fastsft import _C

    def hammer(call, array, bad, good, iterations):
        # Another thread flips `array` between `bad` and `good` while `call` runs with the GIL released.
        stop = threading.Event()
        def mutate():
            while not stop.is_set():
                array[1:] = bad
                array[1:] = good
        thread = threading.Thread(target=mutate)
        thread.start()
        errors = 0
        try:
            for _ in range(iterations):
                try:
                    call()
                except ValueError:
                    errors += 1  # it saw the bad values while checking: a clean error is fine
        finally:
            stop.set()
            thread.join()
        print("survived", iterations)
"""


@pytest.mark.parametrize("target", ["pack_fill", "render_assemble"])
def test_arrays_mutated_by_another_thread(target):
    # Both read offsets after the GIL was released: pack_fill segfaulted, render_assemble wrote out of bounds
    # (hung or crashed) when they changed.
    calls = {
        "pack_fill": """
            n, seq_len = 20_000, 2000
            ids, mask = np.ones(n * 50, dtype=np.int32), np.ones(n * 50, dtype=np.uint8)
            offsets = np.arange(n + 1, dtype=np.int64) * 50
            row, off, placed, rows, _ = _C.pack_place(np.full(n, 50, dtype=np.int64), seq_len, -1, -1)
            hammer(lambda: _C.pack_fill(ids, mask, offsets, row, off, placed, rows, seq_len, 0, rows * 100),
                   offsets, 1 << 40, np.arange(1, n + 1) * 50, 400)
        """,
        "render_assemble": """
            n = 20_000
            tokens = np.ones(n * 50, dtype=np.int32)
            span_offsets = np.arange(n + 1, dtype=np.int64) * 50
            ops = np.full(n, -2, dtype=np.int64)
            conv_ops = np.arange(n + 1, dtype=np.int64)
            hammer(lambda: _C.render_assemble(tokens, span_offsets, ops, conv_ops, 1 << 30),
                   span_offsets, 1 << 40, np.arange(1, n + 1) * 50, 100)
        """,
    }
    out = run_isolated(textwrap.dedent(MUTATOR) + textwrap.dedent(calls[target]))
    assert out.startswith("survived")


def test_int_argument_whose_index_mutates_the_arrays():
    # An int argument can run Python code (__index__) after the arrays were passed: the copies come first.
    out = run_isolated("""
        import numpy as np
        from fastsft import _C
        ids, mask = np.arange(1, 8, dtype=np.int32), np.ones(7, dtype=np.uint8)
        offsets = np.array([0, 4, 7], dtype=np.int64)
        class Sneaky:
            def __index__(self):
                offsets[1:] = 1 << 40  # too late: pack_fill already holds its own copy
                return 8
        result = _C.pack_fill(ids, mask, offsets, np.array([0, 0]), np.array([0, 4]), np.array([4, 3]), 1,
                              Sneaky(), 0, 3)
        print(result[0].tolist(), result[3].tolist())
    """)
    assert out.strip() == "[[1, 2, 3, 4, 5, 6, 7, 0]] [0, 4, 7, 8]"
