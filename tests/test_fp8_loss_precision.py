"""bench/fp8_loss_precision.py: its float64 loss and gradients are cross-entropy's own, and its fp8 emulation
errs where and as much as the formats say."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fp8_loss_precision as lp  # noqa: E402

from eval_helpers import small_tokenizer, tiny_model  # noqa: E402
from fastsft import checkpoint  # noqa: E402


@pytest.mark.parametrize("softcap", [None, 15.0])
def test_float64_loss_and_gradients_are_autograds(softcap):
    h, w, targets, _ = lp.random_inputs(37, 301, 24, seed=1)
    h, w = h.double().requires_grad_(), (w * 40).double().requires_grad_()  # logits of a few units: softcap bites
    loss, dh, dw = lp.loss_and_grads(h, w, targets, softcap)
    z = h @ w.T
    ref = F.cross_entropy(softcap * torch.tanh(z / softcap) if softcap else z, targets)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(dh, h.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dw, w.grad, rtol=1e-10, atol=1e-14)


def test_fp8_errs_more_than_bf16_and_within_e4m3s_rounding():
    rows = lp.compare(*lp.random_inputs(64, 512, 64), "random")
    errors = {r["format"]: r for r in rows}
    for key in ("loss_error", "dh_error", "dw_error"):
        assert 0 < errors["bf16"][key] < errors["fp8"][key]
    for piece in ("fp8 forward only", "fp8 backward h, W only", "fp8 dlogits only (e5m2)"):
        assert 0 < errors[piece]["dh_error"] < errors["fp8"]["dh_error"]  # each a share of the whole
    assert errors["fp8 backward h, W only"]["loss_error"] == 0  # the loss reads the forward alone
    for key in ("dh_error", "dw_error"):
        assert errors["bf16"][key] < 4e-3  # bf16's 8 bits: ~2^-9 a rounding
        assert errors["fp8"][key] < 4e-2  # e4m3's 4 bits: ~2^-5


def test_a_confidently_wrong_row_keeps_its_gradient_of_minus_one():
    """dlogits reach -1 where the target's probability is ~0; the static e5m2 scale must map that exactly (a scale
    of 2^16 would clamp it to 57344 / 65536, 12.5% off, in every such row)."""
    h = torch.zeros(8, 16)
    h[:, 0] = 1.0
    w = torch.zeros(32, 16)
    w[1, 0] = 30.0  # every row predicts token 1 with certainty
    targets = torch.full((8,), 5)
    _, dh64, dw64 = lp.loss_and_grads(h, w, targets, None)
    _, dh, dw = lp.loss_and_grads(h, w, targets, None, "fp8", "fp8", "fp8")
    assert lp.relative(dh, dh64) < 1e-3
    assert lp.relative(dw, dw64) < 1e-3


def test_a_checkpoints_hidden_states_reach_the_comparison(tmp_path, capsys):
    tokenizer = small_tokenizer()
    model = tiny_model(tokenizer.vocab_size, sequence_len=128)
    checkpoint.save(model, tmp_path / "ck", tokenizer=tokenizer)
    rows = lp.main(["--checkpoint", str(tmp_path / "ck"), "--rows", "2", "--json", str(tmp_path / "rows.json")])
    assert [r["format"] for r in rows] == [case[0] for case in lp.CASES]
    assert rows[0]["rows"] > 20 and rows[0]["vocab"] == tokenizer.vocab_size  # supervised positions only
    assert all(r["dh_error"] > 0 and r["dw_error"] > 0 for r in rows)
    assert "checkpoint ck" in capsys.readouterr().out
    assert (tmp_path / "rows.json").is_file()
