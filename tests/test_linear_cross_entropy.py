"""fastsft.kernels.linear_cross_entropy (chunked matmuls + Triton row kernel, interpreted on the CPU) in both layouts
("low_memory": two passes; "fast": one pass with an fp32 dW accumulator) against its fp32 PyTorch reference: values,
both gradients, ignored rows in both placements of the gathered rows, row and vocabulary chunking, the in-place
scatter of dh, torch.compile, the reference fallback where Triton cannot run, bad input. Every call of the op asserts
that its Triton path ran (fastsft.kernels.paths): where Triton cannot run, the op takes the reference, and the
comparison would be the reference against itself."""

import importlib
import json
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastsft.kernels._ce_rows as ce_rows_mod
import fastsft.kernels._scatter_rows as scatter_mod
from fastsft.kernels import paths
from fastsft.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

# By module path: the package re-exports a function of the same name, which `import ... as` may resolve to.
lce_mod = importlib.import_module("fastsft.kernels.linear_cross_entropy")

TOL = {torch.float32: dict(loss=1e-5, grad=1e-5), torch.bfloat16: dict(loss=2e-3, grad=2e-2)}
N, H, V = 37, 50, 203


@pytest.fixture(autouse=True)
def small_vocab_blocks(monkeypatch):
    # V=203 spans four 64-wide blocks in the row kernel (online log-sum-exp across blocks and a partial block).
    monkeypatch.setattr(ce_rows_mod, "INTERPRETED_BLOCK_V", 64)


def chunking(monkeypatch, rows, cols):
    """Pass A in chunks of `rows` rows, pass B in chunks of `cols` vocabulary columns (None: one chunk each)."""
    monkeypatch.setattr(lce_mod, "MAX_ROW_CHUNK", rows)
    if cols is None:
        monkeypatch.setattr(lce_mod, "VOCAB_CHUNK_BYTES", 2**40)
    else:
        monkeypatch.setattr(lce_mod, "VOCAB_CHUNK_BYTES", 0)
        monkeypatch.setattr(lce_mod, "MIN_VOCAB_CHUNK", cols)
        assert lce_mod.vocab_per_chunk(N, V, torch.float32) == cols


def case_seed(dtype, softcap, ignored_fraction):
    return 100 * round(ignored_fraction * 2) + 10 * (softcap is not None) + (dtype == torch.bfloat16)


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def make_case(dtype, ignored_fraction, seed, n=N):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype)  # logits of a few units: softcap 15 bites
    targets = torch.randint(0, V, (n,), generator=gen)
    # Exactly this fraction ignored, so the case decides which layout the gathered rows take (see test below).
    targets[torch.randperm(n, generator=gen)[: round(ignored_fraction * n)]] = -1
    return hidden, weight, targets


def assert_kernel_ran():
    assert paths.ran("linear_cross_entropy") == paths.TRITON, (
        f"linear_cross_entropy took the {paths.ran('linear_cross_entropy')} path, not its Triton kernels")


def run(fn, hidden, weight, targets, softcap, upstream=1.0, grad_hidden=True, grad_weight=True, **kw):
    """Loss, count and both gradients of fn; for the op itself, checks that its kernels made them."""
    paths.reset()
    h = hidden.detach().clone().requires_grad_(grad_hidden)
    w = weight.detach().clone().requires_grad_(grad_weight)
    loss, n = fn(h, w, targets, softcap, **kw)
    if grad_hidden or grad_weight:
        (loss * upstream).backward()
    if fn is linear_cross_entropy:
        assert_kernel_ran()
    return loss.detach(), n, h.grad, w.grad


def assert_close(got, want, dtype, ignored_fraction):
    loss, n, gh, gw = got
    ref_loss, ref_n, ref_gh, ref_gw = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == int(ref_n)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    if ignored_fraction == 1.0:
        assert float(loss) == 0.0 and (gh == 0).all() and (gw == 0).all()
        return
    assert abs(float(loss) - float(ref_loss)) <= TOL[dtype]["loss"] * abs(float(ref_loss))
    assert rel_err(gh, ref_gh) <= TOL[dtype]["grad"]
    assert rel_err(gw, ref_gw) <= TOL[dtype]["grad"]


# (8, 64): several row chunks, four vocabulary chunks (low_memory's pass B), the last one partial. The "fast" layout
# has no vocabulary chunks, so it takes fewer cases (its row-chunk loop is the one it shares with pass A).
MATCH_CASES = [("low_memory", None, None, None, torch.float32), ("low_memory", 8, 64, None, torch.float32),
               ("low_memory", 8, 64, 15.0, torch.float32), ("low_memory", 8, 64, 15.0, torch.bfloat16),
               ("fast", 8, None, 15.0, torch.float32), ("fast", 8, None, 15.0, torch.bfloat16)]


@pytest.mark.parametrize("layout,rows,cols,softcap,dtype", MATCH_CASES)
# 0.25: gathered rows in their own buffer; 0.75: gathered rows parked in the spare rows of the dh output.
@pytest.mark.parametrize("ignored_fraction", [0.0, 0.25, 0.75, 1.0])
def test_matches_reference(monkeypatch, layout, dtype, softcap, ignored_fraction, rows, cols):
    chunking(monkeypatch, rows, cols)
    case = make_case(dtype, ignored_fraction, seed=case_seed(dtype, softcap, ignored_fraction))
    n_sup = int((case[2] != -1).sum())
    assert (2 * n_sup <= N) == (ignored_fraction >= 0.5)
    got = run(linear_cross_entropy, *case, softcap, upstream=0.37, layout=layout)
    want = run(linear_cross_entropy_reference, *case, softcap, upstream=0.37)
    assert int(got[1]) == n_sup
    assert (got[2][case[2] == -1] == 0).all()  # ignored rows get exactly zero hidden gradient
    assert_close(got, want, dtype, ignored_fraction)


@pytest.mark.parametrize("n_rows,n_sup,hidden_size,block_rows,block_cols,dtype", [
    (41, 17, 6, 2, None, torch.float32), (41, 20, 7, 1, 2, torch.bfloat16), (40, 40, 5, 4, None, torch.float32),
    (33, 1, 3, 4, 2, torch.float32), (64, 63, 9, 8, 4, torch.bfloat16), (29, 0, 4, 8, None, torch.float32)])
def test_in_place_scatter_matches_index_copy(monkeypatch, n_rows, n_sup, hidden_size, block_rows, block_cols, dtype):
    # Sorted destinations with runs of rows[k] == k and large jumps: every overlap case of the blockwise move, over
    # several row blocks and (block_cols) several programs of column slices.
    gen = torch.Generator().manual_seed(n_rows * 100 + n_sup)
    rows = torch.randperm(n_rows, generator=gen)[:n_sup].sort().values
    targets = torch.full((n_rows,), -1)
    targets[rows] = torch.randint(0, 50, (n_sup,), generator=gen)
    dh = (torch.randn(n_rows, hidden_size, generator=gen) + 3.0).to(dtype)  # never zero: a missed move shows
    want = torch.zeros_like(dh).index_copy_(0, rows, dh[:n_sup])
    monkeypatch.setattr(scatter_mod, "INTERPRETED_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(scatter_mod, "INTERPRETED_BLOCK_COLS", block_cols)
    scatter_mod.scatter_rows_home(dh, targets, n_sup)
    assert torch.equal(dh, want)


@pytest.mark.parametrize("n_rows,hidden_size,vocab,cols,tail,spare_cols", [
    (28, 50, 203, 64, 8, 0), (9, 50, 203, 64, 8, 0), (16384, 1024, 65536, 512, 128, 0),
    (16384, 2048, 151936, 512, 128, 0), (3000, 7, 1001, 300, 1, 0), (5, 3, 11, 64, 64, 0),
    (24576, 1024, 65536, 512, 16, 341), (24576, 1024, 65536, 256, 16, 1000), (28, 50, 203, 64, 8, 9.5),
    (28, 50, 203, 64, 8, 7.9)])
def test_vocab_chunks_keep_the_tile_in_free_memory(monkeypatch, n_rows, hidden_size, vocab, cols, tail, spare_cols):
    # spare_cols: dh's free rows hold a tile of that many columns of all n_rows rows (the 24576 cases: a quarter of
    # 32768 targets ignored, so dh[M:N] is free).
    monkeypatch.setattr(lce_mod, "VOCAB_CHUNK_BYTES", 0)
    monkeypatch.setattr(lce_mod, "MIN_VOCAB_CHUNK", cols)
    monkeypatch.setattr(lce_mod, "TAIL_COLS", tail)
    spare = int(spare_cols * n_rows)
    chunks = lce_mod.vocab_chunks(n_rows, vocab, hidden_size, torch.bfloat16, spare)
    assert [c[0] for c in chunks] == [0] + [c[1] for c in chunks[:-1]] and chunks[-1][1] == vocab  # in order, all
    cols = min(cols, vocab)
    for v0, v1, place in chunks:
        assert 0 < v1 - v0 <= (min(cols, tail) if place == "split" else cols)
        if place == "dw":  # the tile, dW's last n_rows * width elements, starts at or after row v1
            assert n_rows * (v1 - v0) <= (vocab - v1) * hidden_size
        elif place == "spare":
            assert n_rows * (v1 - v0) <= spare
        else:  # a row block's tile starts at or after row v0 (its own rows are written from the accumulator last)
            assert place == "split"
            block = lce_mod.split_rows(n_rows, vocab, hidden_size, v0, v1 - v0)
            assert 1 <= block <= n_rows and block * (v1 - v0) <= (vocab - v0) * hidden_size
    # Full-width chunks in dW while they fit, then narrower ones, then (for only the very end of V) split chunks, or
    # from where dh's spare rows hold a wider tile, spare chunks of one width to the end and no split ones.
    places = [place for _, _, place in chunks]
    first_other = next((i for i, p in enumerate(places) if p != "dw"), len(places))
    assert len(set(places[first_other:])) <= 1
    widths = [v1 - v0 for v0, v1, place in chunks if place == "dw"]
    assert widths == sorted(widths, reverse=True)
    spare_widths = {v1 - v0 for v0, v1, place in chunks[:-1] if place == "spare"}
    assert len(spare_widths) <= 1 and ("split" not in places if spare_cols >= tail else "spare" not in places)
    narrow = [w for w in widths if w < cols]
    tail_cols = sum(v1 - v0 for v0, v1, place in chunks if place == "split")
    assert tail_cols <= tail * (n_rows + hidden_size) / hidden_size + tail
    if vocab == 65536 and not spare:  # the bench shape: 112 chunks of 512, then narrower ones, split ones at the end
        assert len(narrow) > 3 and 0 < tail_cols < 0.05 * vocab
    if spare_cols >= cols:
        assert places == ["spare"] * len(places)


def test_vocab_chunk_widths_keep_one_triton_specialization_for_any_number_of_supervised_rows():
    """The tile kernels take a chunk's width as an argument; Triton compiles a kernel again for a width of a new
    class (divisible by 16 or not). At d20's loss shape (32768 rows, width 1280, vocabulary 32768) and the op's own
    spare rows, every chunk width for any number of supervised rows is a multiple of 16 (narrow chunks rounded to
    8 gave widths like 120 for 15615 supervised rows)."""
    N, H, V = 32768, 1280, 32768
    widths = set()
    for n_sup in range(1, N + 1, 37):
        spare = (N - (2 if 2 * n_sup <= N else 1) * n_sup) * H  # dh's rows beyond the gathered ones
        widths |= {v1 - v0 for v0, v1, _ in lce_mod.vocab_chunks(n_sup, V, H, torch.bfloat16, spare)}
    assert len(widths) > 5 and all(w % 16 == 0 for w in widths), sorted(w for w in widths if w % 16)


@pytest.mark.parametrize("dtype,ignored_fraction,fused", [(torch.bfloat16, 0.25, True), (torch.bfloat16, 0.75, True),
                                                         (torch.bfloat16, 0.5, True), (torch.float32, 0.5, False)])
def test_pass_b_tiles_live_in_unwritten_dw(monkeypatch, dtype, ignored_fraction, fused):
    # Small sizes covering the three walks: half ignored, so dh has no spare rows: the tile shrinks several times in
    # dW and the last chunks go in row blocks (more supervised rows than H, so a split chunk needs several); a
    # quarter ignored: dh's spare rows take over once the dW tile would be narrower than they hold; three quarters:
    # every tile in dh's spare rows. Before each pass-B tile in dW, everything of dW not yet written and not holding
    # the tile is poisoned with NaN: a slice left unwritten, a tile over an already written slice, or a matmul
    # reading the slice it writes shows in the gradients. fused (bf16 only, the op keeps cuBLAS for fp32): the tile
    # comes from one Triton matmul with the row kernel as its epilogue; else from cuBLAS, then the row kernel.
    chunking(monkeypatch, 8, 64)
    monkeypatch.setattr(lce_mod, "TAIL_COLS", 8)
    monkeypatch.setattr(lce_mod, "FUSED_GRAD_TILE", fused)
    n = 120
    case = make_case(dtype, ignored_fraction, seed=31, n=n)
    n_sup = int((case[2] != -1).sum())
    spare = n - (2 if 2 * n_sup <= n else 1) * n_sup  # dh's rows beyond the gathered ones, free during pass B
    schedule = lce_mod.vocab_chunks(n_sup, V, H, dtype, spare * H)
    places = [place for *_, place in schedule]
    narrow_in_dw = sum(place == "dw" and v1 - v0 < 64 for v0, v1, place in schedule)
    blocks = [(v0, v1, place, r0) for v0, v1, place in schedule for r0 in range(
        0, n_sup, lce_mod.split_rows(n_sup, V, H, v0, v1 - v0) if place == "split" else n_sup)]
    if ignored_fraction == 0.5:
        assert spare == 0 and narrow_in_dw >= 2 and places[-1] == "split" and any(r0 > 0 for *_, r0 in blocks)
    elif ignored_fraction == 0.25:
        assert narrow_in_dw >= 2 and places[-1] == "spare" and "split" not in places
    else:
        assert set(places) == {"spare"}
    seen, via_calls = [], []

    def check_and_poison(tile, v0, via):
        via_calls.append(via)
        width = tile.shape[1]
        storage = tile.untyped_storage()
        whole = torch.empty(0, dtype=dtype).set_(storage)  # flat view of the storage the tile lives in
        start = (tile.data_ptr() - storage.data_ptr()) // tile.element_size()
        place = next(p for c0, _, p in schedule if c0 == v0)
        if place == "spare":  # in dh, past the supervised (and parked) rows
            assert whole.numel() == n * H and start == (n - spare) * H
        else:
            assert whole.numel() == V * H
            assert start + tile.numel() == V * H and start >= (v0 + width if place == "dw" else v0) * H
            whole[(v0 + width) * H if place == "dw" else v0 * H:start] = float("nan")
        seen.append((v0, v0 + width, place))

    real_ce_rows, real_grad_tile = lce_mod.ce_rows, lce_mod.grad_tile

    def poisoning_ce_rows(logits, targets, lse, loss, **kw):
        if not kw.get("compute_lse", True):  # pass B (pass A computes the lse)
            check_and_poison(logits, kw["col_offset"], "ce_rows")
        return real_ce_rows(logits, targets, lse, loss, **kw)

    def poisoning_grad_tile(h, weight, v0, v1, targets, lse, scale, out, **kw):
        check_and_poison(out, v0, "grad_tile")
        return real_grad_tile(h, weight, v0, v1, targets, lse, scale, out, **kw)

    monkeypatch.setattr(lce_mod, "ce_rows", poisoning_ce_rows)
    monkeypatch.setattr(lce_mod, "grad_tile", poisoning_grad_tile)
    got = run(linear_cross_entropy, *case, 15.0, upstream=0.37)
    assert seen == [b[:3] for b in blocks]
    assert set(via_calls) == {"grad_tile" if fused else "ce_rows"}
    assert_close(got, run(linear_cross_entropy_reference, *case, 15.0, upstream=0.37), dtype, ignored_fraction)


def peak_bytes_allocated(fn, trace_path):
    """Peak of the CPU allocator's live bytes while fn() runs, above what was live at its start (profiler trace)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_path))
    events = [e for e in json.loads(trace_path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: e["ts"])
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start


@pytest.mark.parametrize("ignored_fraction", [0.5, 0.0])
def test_workspace_beyond_the_gradients_is_two_vectors_and_the_tail_accumulator(monkeypatch, tmp_path,
                                                                                  ignored_fraction):
    # The low_memory layout's whole forward + backward may hold, besides the two gradients: lse and the row indices
    # (M,), one chunk of per-row losses and the (TAIL_COLS, H) fp32 accumulator of the split chunks; no staging copy
    # of dh, no gathered targets, no tile outside dW. fp32, because the CPU's bf16 matmul into `out=` makes a
    # temporary of its own. Half ignored: the gathered rows exactly fill dh's spare rows (the bench's case).
    monkeypatch.setattr(lce_mod, "VOCAB_CHUNK_BYTES", 0)
    monkeypatch.setattr(lce_mod, "MIN_VOCAB_CHUNK", 64)
    n, hidden_size, vocab = 96, 16, 600
    gen = torch.Generator().manual_seed(41)
    hidden = torch.randn(n, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[: round(ignored_fraction * n)]] = -1
    m = int((targets >= 0).sum())
    schedule = lce_mod.vocab_chunks(m, vocab, hidden_size, torch.float32, 0)  # half or none ignored: no spare rows
    assert any(lce_mod.split_rows(m, vocab, hidden_size, v0, v1 - v0) < m for v0, v1, place in schedule
               if place == "split")

    def step():
        loss, _ = linear_cross_entropy(hidden, weight, targets)
        loss.backward()

    peak = peak_bytes_allocated(step, tmp_path / "trace.json")
    gradients = 4 * (n + vocab) * hidden_size
    gathered = m < n
    budget = 4 * m * (1 + gathered) + 4 * lce_mod.rows_per_chunk(m, vocab, hidden_size) \
        + 4 * lce_mod.TAIL_COLS * hidden_size + 1024  # the last term: scalars
    assert gradients < peak <= gradients + budget, (peak - gradients, budget)


@pytest.mark.parametrize("layout", ["low_memory", "fast"])
def test_ignored_rows_never_reach_a_matmul(layout):
    hidden, weight, targets = make_case(torch.float32, 0.5, seed=11)
    poisoned = hidden.clone()
    poisoned[targets == -1] = float("nan")  # would poison every logit column sum if an ignored row were multiplied
    got = run(linear_cross_entropy, poisoned, weight, targets, 15.0, layout=layout)
    want = run(linear_cross_entropy_reference, hidden, weight, targets, 15.0)
    assert_close(got, want, torch.float32, 0.5)


@pytest.mark.parametrize("layout,grad_hidden,grad_weight", [
    ("low_memory", True, False), ("low_memory", False, True), ("low_memory", False, False),
    ("fast", True, False), ("fast", False, True)])
@pytest.mark.parametrize("ignored_fraction", [0.75])
def test_partial_and_no_grad(monkeypatch, layout, grad_hidden, grad_weight, ignored_fraction):
    # Without dW, pass A cannot borrow the dW output (and "fast" has no accumulator); without dh, the gathered rows
    # cannot park in it.
    chunking(monkeypatch, 8, 64)
    case = make_case(torch.float32, ignored_fraction, seed=13)
    loss, n, gh, gw = run(linear_cross_entropy, *case, 15.0, grad_hidden=grad_hidden, grad_weight=grad_weight,
                          layout=layout)
    ref_loss, _, ref_gh, ref_gw = run(linear_cross_entropy_reference, *case, 15.0, grad_hidden=True, grad_weight=True)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert (gh is None) == (not grad_hidden) and (gw is None) == (not grad_weight)
    if grad_hidden:
        assert rel_err(gh, ref_gh) <= 1e-5
    if grad_weight:
        assert rel_err(gw, ref_gw) <= 1e-5
    paths.reset()
    with torch.no_grad():
        nograd_loss, nograd_n = linear_cross_entropy(case[0], case[1].requires_grad_(), case[2], 15.0, layout=layout)
    assert_kernel_ran()
    assert float(nograd_loss) == pytest.approx(float(ref_loss), rel=1e-5) and int(nograd_n) == int(n)


@pytest.mark.parametrize("layout", ["low_memory", "fast"])
def test_outputs_fully_written(monkeypatch, layout):
    # Deterministic mode fills torch.empty with NaN: a chunk, row or gradient element left unwritten shows up,
    # e.g. a part of the dW output that pass A borrowed and pass B did not overwrite.
    chunking(monkeypatch, 8, 64)
    case = make_case(torch.bfloat16, 0.5, seed=14)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        loss, n, gh, gw = run(linear_cross_entropy, *case, 15.0, layout=layout)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("backend,dtype,softcap,grad_in_backward,layout", [
    ("aot_eager", torch.float32, 15.0, True, "low_memory"),
    ("inductor", torch.bfloat16, 15.0, False, "fast"),
])
def test_compiled_equals_eager_with_ignored_targets(monkeypatch, backend, dtype, softcap, grad_in_backward, layout):
    chunking(monkeypatch, 8, 64)
    monkeypatch.setattr(lce_mod, "GRAD_IN_BACKWARD", grad_in_backward)
    hidden, weight, targets = make_case(dtype, 0.5, seed=15)

    def mean_loss(h, w):
        loss, n = linear_cross_entropy(h, w, targets, softcap, layout=layout)
        return loss / n.clamp(min=1)

    outs = []
    for fn in (torch.compile(mean_loss, backend=backend, fullgraph=True), mean_loss):
        paths.reset()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = fn(h, w)
        value.backward()
        assert_kernel_ran()  # compiled too: the custom op runs its body inside the graph
        outs.append((value.detach(), h.grad, w.grad))
    for got, want in zip(*outs):
        assert torch.equal(got, want)  # same kernels, same order: bit-identical
    ref, ref_n = linear_cross_entropy_reference(hidden, weight, targets, softcap)
    assert abs(float(outs[0][0]) - float(ref / ref_n)) <= TOL[dtype]["loss"] * abs(float(ref / ref_n))


@pytest.mark.parametrize("ignored_fraction,layout", [(0.25, "low_memory"), (0.75, "fast")])
def test_gradients_made_in_backward_match_reference(monkeypatch, ignored_fraction, layout):
    chunking(monkeypatch, 8, 64)
    monkeypatch.setattr(lce_mod, "GRAD_IN_BACKWARD", True)
    case = make_case(torch.bfloat16, ignored_fraction, seed=19)
    got = run(linear_cross_entropy, *case, 15.0, upstream=0.37, layout=layout)
    assert_close(got, run(linear_cross_entropy_reference, *case, 15.0, upstream=0.37), torch.bfloat16,
                 ignored_fraction)
    # Nothing is scaled in place in this mode, so a second backward through one forward is allowed and equal.
    h, w = case[0].clone().requires_grad_(), case[1].clone().requires_grad_()
    loss, _ = linear_cross_entropy(h, w, case[2], 15.0, layout=layout)
    loss.backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    paths.reset()
    loss.backward()
    assert_kernel_ran()  # the backward itself ran the op's kernels again
    assert torch.equal(h.grad, first[0]) and torch.equal(w.grad, first[1])


@pytest.mark.parametrize("layout", ["low_memory", "fast"])
def test_gradients_handed_to_autograd_without_a_copy(monkeypatch, layout):
    # autograd takes a gradient into .grad only when nothing else owns it; otherwise it copies it (twice the memory).
    made = {}

    def recording(*args):
        out = forward_impl(*args)
        made.update(dh=out[2].data_ptr(), dw=out[3].data_ptr())
        return out

    forward_impl = lce_mod._forward_impl
    monkeypatch.setattr(lce_mod, "_forward_impl", recording)
    _, _, gh, gw = run(linear_cross_entropy, *make_case(torch.bfloat16, 0.75, seed=20), None, layout=layout)
    assert gh.data_ptr() == made["dh"] and gw.data_ptr() == made["dw"]


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.made.append((str(func), tuple(out.shape)))
        return out


@pytest.mark.parametrize("grad_in_backward", [False, True])
def test_backward_allocates_no_gradient_sized_buffer_besides_the_gradients(monkeypatch, grad_in_backward):
    # E.g. autograd materializing zero "gradients" for the dh/dW outputs of the forward: a second copy at the peak.
    monkeypatch.setattr(lce_mod, "GRAD_IN_BACKWARD", grad_in_backward)
    hidden, weight, targets = make_case(torch.float32, 0.0, seed=21)  # nothing ignored: no gathered rows
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = linear_cross_entropy(h, w, targets)
    with _OpLog() as log:
        loss.backward()
    fresh = [op for op, shape in log.made if shape in (tuple(h.shape), tuple(w.shape))
             and not op.startswith(("aten.mul_", "aten.detach", "aten.mm", "aten.masked_fill_"))]
    assert fresh == [], log.made  # (the op of GRAD_IN_BACKWARD returns a tuple: its gradients are not listed)


def test_second_backward_through_one_forward_raises():
    hidden, weight, targets = make_case(torch.float32, 0.5, seed=17)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = linear_cross_entropy(h, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_empty_batch():
    hidden, weight, targets = make_case(torch.float32, 0.0, seed=18, n=0)
    loss, n, gh, gw = run(linear_cross_entropy, hidden, weight, targets, None)
    assert float(loss) == 0.0 and int(n) == 0 and gh.shape == (0, H) and (gw == 0).all()


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets = make_case(torch.float32, 0.0, seed=16, n=5)
    with pytest.raises(ValueError, match=rf"outside \[-1, {V}\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, V, -1, 2]))
    with pytest.raises(ValueError, match=rf"outside \[-1, {V}\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, -100, 1, -1, 2]))
    with pytest.raises(ValueError, match="hidden size differs"):
        linear_cross_entropy(hidden[:, :-1], weight, targets)
    with pytest.raises(TypeError, match="one float dtype"):
        linear_cross_entropy(hidden, weight.bfloat16(), targets)
    with pytest.raises(ValueError, match=r"targets must be \(N,\)"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(TypeError, match="int64"):
        linear_cross_entropy(hidden, weight, targets.int())
    with pytest.raises(ValueError, match=r"\(N, H\)"):
        linear_cross_entropy(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(hidden, weight, targets, softcap=0.0)
    with pytest.raises(ValueError, match="layout must be one of"):
        linear_cross_entropy(hidden, weight, targets, layout="fastest")
    logits = hidden @ weight.t()
    with pytest.raises(ValueError, match="col_offset"):
        ce_rows_mod.ce_rows(logits, targets, torch.empty(5), torch.empty(5), col_offset=64)


@pytest.mark.parametrize("max_rows", [64, 16])
def test_fast_layout_dw_made_late_or_borrowed_as_chunk_buffer(monkeypatch, max_rows):
    # bf16 "fast": a chunk of more than H rows cannot live in the dW output, so dW is made from the accumulator
    # after the chunk buffer is gone (64 > H); a smaller chunk lives in dW until the accumulator is copied in (16).
    monkeypatch.setattr(lce_mod, "MAX_ROW_CHUNK", max_rows)
    case = make_case(torch.bfloat16, 0.25, seed=23, n=120)  # 90 supervised rows: two chunks of 64, six of 16
    assert (lce_mod.fast_rows_per_chunk(90, V, torch.bfloat16) > H) == (max_rows > H)
    torch.use_deterministic_algorithms(True, warn_only=True)  # NaN-filled torch.empty: unwritten elements show
    try:
        got = run(linear_cross_entropy, *case, 15.0, upstream=0.37, layout="fast")
    finally:
        torch.use_deterministic_algorithms(False)
    assert_close(got, run(linear_cross_entropy_reference, *case, 15.0, upstream=0.37), torch.bfloat16, 0.25)


def test_fast_rows_per_chunk_has_a_row_floor(monkeypatch):
    # The floor keeps the fp32 accumulator's read+write per chunk rare at large vocabularies (module constants).
    monkeypatch.setattr(lce_mod, "MAX_ROW_CHUNK", None)
    assert lce_mod.fast_rows_per_chunk(10**6, 151936, torch.bfloat16) == lce_mod.FAST_MIN_ROWS
    assert lce_mod.fast_rows_per_chunk(10**6, 1000, torch.bfloat16) == lce_mod.FAST_CHUNK_BYTES // 2000
    assert lce_mod.fast_rows_per_chunk(37, 1000, torch.bfloat16) == 37


CPU_FALLBACK_SCRIPT = textwrap.dedent("""
    import torch
    from fastsft.kernels import paths
    from fastsft.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(13, 9, generator=gen), torch.randn(29, 9, generator=gen)
    targets = torch.randint(0, 29, (13,), generator=gen)
    targets[::3] = -1
    for layout in ("low_memory", "fast"):
        outs = []
        for fn, kw in ((linear_cross_entropy, dict(layout=layout)), (linear_cross_entropy_reference, {})):
            paths.reset()
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss, n = fn(h, w, targets, 7.0, **kw)
            (loss * 0.37).backward()
            outs.append((loss.detach(), n, h.grad, w.grad))
            if fn is linear_cross_entropy:  # the fallback says so
                assert paths.ran("linear_cross_entropy") == paths.REFERENCE, paths.ran("linear_cross_entropy")
        for got, want in zip(*outs):
            assert torch.equal(got, want), (layout, got, want)
    try:
        linear_cross_entropy(hidden, weight, torch.full((13,), 29))
    except ValueError as e:
        assert "outside [-1, 29)" in str(e), e
    else:
        raise AssertionError("out-of-range targets were accepted")
    print("ok")
""")


def test_cpu_without_interpreter_falls_back_to_the_reference(run_without_interpreter):
    # Without TRITON_INTERPRET=1 a CPU tensor cannot reach a Triton kernel ("0 active drivers"): the op must use the
    # reference math instead. A fresh interpreter, since the test session itself runs with the interpreter on.
    code, out, err = run_without_interpreter(CPU_FALLBACK_SCRIPT)
    assert code == 0 and out.strip() == "ok", err[-2000:]


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value back to the host (item(), int(), bool() of a tensor)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ignored_fraction,layout,grad_in_backward", [
    (0.4, "low_memory", False), (0.4, "fast", True), (0.0, "fast", False), (1.0, "low_memory", False)])
def test_count_known_on_the_host_gives_the_same_results_without_reading_the_device(
        monkeypatch, ignored_fraction, layout, grad_in_backward):
    chunking(monkeypatch, 8, 64)
    monkeypatch.setattr(lce_mod, "GRAD_IN_BACKWARD", grad_in_backward)
    case = make_case(torch.bfloat16, ignored_fraction, seed=23)
    want = run(linear_cross_entropy, *case, 15.0, layout=layout)
    known = int((case[2] >= 0).sum())

    def no_list(self):
        raise AssertionError("the op read a tensor back to the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_list)
    with _HostReads() as reads:
        got = run(linear_cross_entropy, *case, 15.0, layout=layout, num_supervised=known)
    assert reads.reads == 0
    monkeypatch.undo()
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # same kernels on the same rows: bit-identical
    assert int(got[1]) == known


def test_count_known_on_the_host_is_range_checked():
    hidden, weight, targets = make_case(torch.float32, 0.5, seed=29)
    with pytest.raises(ValueError, match="num_supervised must be in"):
        linear_cross_entropy(hidden, weight, targets, num_supervised=N + 1)
