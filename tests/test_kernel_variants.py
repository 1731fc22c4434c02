"""Kernel variants are chosen by argument (LCETuning, GradTileLaunch, ce_rows' num_warps), never by module state:
a variant changes what runs, gives the reference's result, and leaves the module defaults untouched."""

import importlib

import pytest
import torch

from fastsft.kernels import paths
from fastsft.kernels._grad_tile import DEFAULT_LAUNCH, GradTileLaunch
from fastsft.kernels.linear_cross_entropy import LCETuning, linear_cross_entropy, linear_cross_entropy_reference

lce_mod = importlib.import_module("fastsft.kernels.linear_cross_entropy")
ORIGINAL = {"forward": lce_mod._forward_impl, "ce_rows": lce_mod.ce_rows, "grad_tile": lce_mod.grad_tile}
N, H, V = 40, 24, 150


def case(seed=0):
    g = torch.Generator().manual_seed(seed)
    # bf16: the fused pass-B tile runs for 16-bit inputs only (fp32 keeps cuBLAS + the row kernel)
    hidden = torch.randn(N, H, generator=g).bfloat16().requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = -1
    return hidden, weight, targets


def run(tuning, monkeypatch):
    """Loss and gradients of one call, and how often the forward body, the row kernel and the fused tile ran."""
    calls = {"forward": 0, "ce_rows": 0, "grad_tile": 0, "pass_a_rows": 0}

    def counting(name):
        fn = ORIGINAL[name]

        def wrapped(*args, **kwargs):
            calls[name] += 1
            if name == "ce_rows" and kwargs.get("compute_lse", True):  # pass A's calls find the lse
                calls["pass_a_rows"] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(lce_mod, "_forward_impl", counting("forward"))
    monkeypatch.setattr(lce_mod, "ce_rows", counting("ce_rows"))
    monkeypatch.setattr(lce_mod, "grad_tile", counting("grad_tile"))
    hidden, weight, targets = case()
    paths.reset()
    loss, n = linear_cross_entropy(hidden, weight, targets, tuning=tuning)
    loss.backward()
    assert paths.ran("linear_cross_entropy") == paths.TRITON  # not the reference compared with itself
    return loss.detach(), hidden.grad, weight.grad, calls


def test_variants_change_what_runs_and_agree_with_the_reference(monkeypatch):
    if not lce_mod.runs_triton(torch.device("cpu")):
        pytest.skip("needs Triton (a GPU or its interpreter)")
    hidden, weight, targets = case()
    want = linear_cross_entropy_reference(hidden, weight, targets)[0]
    want_dh, want_dw = (g.float() for g in torch.autograd.grad(want, (hidden, weight)))
    defaults = {k: getattr(lce_mod, k) for k in ("MAX_ROW_CHUNK", "VOCAB_CHUNK_BYTES", "FUSED_GRAD_TILE",
                                                  "GRAD_IN_BACKWARD", "MIN_VOCAB_CHUNK")}
    runs = {
        "default": run(None, monkeypatch),
        "row chunks": run(LCETuning(max_row_chunk=8), monkeypatch),
        "unfused, narrow vocab chunks": run(LCETuning(fused_grad_tile=False, vocab_chunk_bytes=0,
                                                      min_vocab_chunk=32), monkeypatch),
        "grad in backward": run(LCETuning(grad_in_backward=True), monkeypatch),
    }
    rel = lambda got, ref: ((got.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    for name, (loss, dh, dw, _) in runs.items():
        assert rel(loss, want.detach()) < 2e-3 and rel(dh, want_dh) < 2e-2 and rel(dw, want_dw) < 2e-2, name
    calls = {name: r[3] for name, r in runs.items()}
    supervised = int((targets >= 0).sum())
    # pass A: chunks of H rows by default (H < 128), of 8 rows with max_row_chunk=8
    assert calls["default"]["pass_a_rows"] == -(-supervised // H)
    assert calls["row chunks"]["pass_a_rows"] == -(-supervised // 8)
    assert calls["default"]["grad_tile"] >= 1 and calls["unfused, narrow vocab chunks"]["grad_tile"] == 0
    assert calls["unfused, narrow vocab chunks"]["ce_rows"] >= 1 + -(-V // 32)  # pass A + one per vocab chunk
    assert calls["default"]["forward"] == 1 and calls["grad in backward"]["forward"] == 2  # loss, then recompute
    assert {k: getattr(lce_mod, k) for k in defaults} == defaults


def test_tuning_round_trips_through_the_op_argument():
    tuning = LCETuning(vocab_chunk_bytes=8 << 20, fused_grad_tile=False, grad_tile_launch=GradTileLaunch(num_warps=8))
    assert lce_mod._decode(tuning.encode()) == tuning
    assert LCETuning().encode() == "" and lce_mod._decode("") == LCETuning()
    assert lce_mod._knob(tuning, "tail_cols") == lce_mod.TAIL_COLS  # unset: the module default
    assert lce_mod._knob(tuning, "vocab_chunk_bytes") == 8 << 20
    assert DEFAULT_LAUNCH == GradTileLaunch()


def test_variant_entry_points_take_their_arguments():
    """grad_tile and ce_rows take the launch variants as arguments (what bench/gpu_loss.py sweeps)."""
    import inspect

    from fastsft.kernels._ce_rows import ce_rows
    from fastsft.kernels._grad_tile import grad_tile

    assert inspect.signature(grad_tile).parameters["launch"].default is DEFAULT_LAUNCH
    assert inspect.signature(ce_rows).parameters["num_warps"].default is None
