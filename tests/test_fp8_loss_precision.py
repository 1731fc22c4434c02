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


def test_the_training_emulation_is_cross_entropys_sum_in_float64():
    import fp8_loss_training as lt

    h, w, targets, _ = lp.random_inputs(29, 97, 16, seed=2)
    targets[::3] = -1  # unsupervised rows: no loss, no gradient
    h, w = h.double().requires_grad_(), (w * 40).double().requires_grad_()
    loss = lt.EmulatedLoss.apply(h, w, targets, 15.0, "fp64")
    loss.backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    z = ref_h @ ref_w.T
    ref = F.cross_entropy(15.0 * torch.tanh(z / 15.0), targets, ignore_index=-1, reduction="sum")
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-10, atol=1e-14)
    assert h.grad[::3].abs().max() == 0


def test_a_run_trains_through_the_emulated_loss_and_gives_the_model_its_own_back(tmp_path, monkeypatch):
    import fp8_loss_training as lt
    from fastsft.model import GPT

    rounded = []
    e5m2 = lp.DLOGITS["fp8"]
    monkeypatch.setitem(lp.DLOGITS, "fp8", lambda d: rounded.append(d.shape) or e5m2(d))
    own = GPT.supervised_loss
    args = ["--format", "fp8", f"--out_dir={tmp_path}", "--data=synthetic:spell?size=200", "--model.n_layer=1",
            "--model.n_embd=64", "--model.n_head=2", "--model.n_kv_head=2", "--seq_len=128", "--device_batch_size=2",
            "--tokenizer_vocab_size=300", "--eval_every=0", "--answer_accuracy=false", "--samples=0",
            "--eval_metrics=", "--target_examples_per_step=0", "--target_tokens_per_step=256", "--num_iterations=2"]
    assert lt.main(args) == 0
    assert len(rounded) == 2  # one training step each, evaluation on the model's own loss
    assert GPT.supervised_loss is own
    assert (tmp_path / "summary.json").is_file()
