"""Checkpoints: exact save/load round trips without pickle, atomic writes, nanochat import and its pickle refusal."""

import json
import pickle
import random
import shutil
import types

import numpy as np
import pytest
import torch

from fastsft import checkpoint
from fastsft.checkpoint import (capture_rng_state, import_nanochat_tokenizer, load, load_nanochat, restore_rng_state,
                                save)
from fastsft.model import GPT, GPTConfig


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(sequence_len=32, vocab_size=75, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),
                          **overrides})
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # init zeroes some tensors; make every value distinctive
            p.add_(torch.randn_like(p) * 0.1)
    return model


def trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    loss = model(idx).float().square().mean()
    loss.backward()
    opt.step()
    return opt


def assert_same_tree(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def test_round_trip_is_exact(tmp_path):
    model = tiny_model(seed=1, vocab_size=75)  # padded to 128 rows
    opt = trained_optimizer(model)
    train_state = {
        "step": 17,
        "optimizers": [opt.state_dict()],
        "rng": capture_rng_state(),
        "data": {"epoch": 0, "position": 123456789012, "order": np.arange(7, dtype=np.int64) * 3},
        "odd": {3: (1.5, float("inf"), None), "__x": [True, "s"]},
    }
    save(model, tmp_path / "ck", train_state=train_state, meta={"note": "test"})
    loaded, extras = load(tmp_path / "ck")
    assert extras["config"] == model.config and loaded.config == model.config
    assert extras["meta"] == {"note": "test"} and extras["tokenizer"] is None
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for name in original:
        assert original[name].dtype == restored[name].dtype and torch.equal(original[name], restored[name]), name
    assert_same_tree(train_state, extras["train_state"])
    # The restored optimizer state drives an identical next step.
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3, betas=(0.8, 0.95))
    opt2.load_state_dict(extras["train_state"]["optimizers"][0])
    idx = torch.randint(0, 75, (2, 9), generator=torch.Generator().manual_seed(3))
    for m, o in ((model, opt), (loaded, opt2)):
        o.zero_grad()
        m(idx).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


def test_bf16_weights_round_trip(tmp_path):
    model = tiny_model(seed=2).to(torch.bfloat16)
    save(model, tmp_path / "ck")
    loaded, _ = load(tmp_path / "ck")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), name


def test_rng_state_round_trip_replays_the_same_numbers(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    save(tiny_model(), tmp_path / "ck", train_state={"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    _, extras = load(tmp_path / "ck")
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(extras["train_state"]["rng"])
    got = (random.random(), np.random.rand(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_tokenizer_is_saved_and_loaded(tmp_path):
    from fastsft.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["hello world, hello packed conversations"] * 20, vocab_size=300)
    save(tiny_model(), tmp_path / "ck", tokenizer=tok)
    _, extras = load(tmp_path / "ck")
    text = "hello conversations world"
    assert extras["tokenizer"].encode(text) == tok.encode(text)
    assert extras["tokenizer"].vocab_size == tok.vocab_size


def test_unsaveable_training_state_raises_naming_the_place(tmp_path):
    with pytest.raises(TypeError, match=r"\['loader'\].*set"):
        save(tiny_model(), tmp_path / "ck", train_state={"loader": {1, 2}})


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = tiny_model(seed=3)
    target = tmp_path / "ck"
    save(model, target)
    before = (target / checkpoint.MODEL_FILE).read_bytes()
    real_save_file = checkpoint.save_file

    def dies_mid_write(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # a partly written file, then the crash
            f.truncate(100)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint, "save_file", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save(tiny_model(seed=4), target)
    assert (target / checkpoint.MODEL_FILE).read_bytes() == before  # the old version, whole
    assert sorted(p.name for p in target.iterdir()) == [checkpoint.CONFIG_FILE, checkpoint.MODEL_FILE]
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing half-written, no temporary left behind
    monkeypatch.undo()
    loaded, _ = load(target)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_checkpoint_never_mixes_files_of_two_saves(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    save(tiny_model(seed=3), target, train_state={"lr": torch.tensor([1.0]), "mom": torch.tensor([2.0, 2.0])})
    real_write_json = checkpoint._write_json

    def dies_after_state_tensors(path, data):
        if path.name == checkpoint.STATE_JSON_FILE:
            raise KeyboardInterrupt("crash between the training-state tensors and their JSON")
        real_write_json(path, data)

    monkeypatch.setattr(checkpoint, "_write_json", dies_after_state_tensors)
    with pytest.raises(KeyboardInterrupt):
        save(tiny_model(seed=4), target, train_state={"mom": torch.tensor([0.5]), "lr": torch.tensor([9.0, 9.0])})
    monkeypatch.undo()
    _, extras = load(target)
    assert torch.equal(extras["train_state"]["lr"], torch.tensor([1.0]))  # the old state, whole
    assert torch.equal(extras["train_state"]["mom"], torch.tensor([2.0, 2.0]))

    save(tiny_model(seed=5), target)  # a save without training state leaves none behind
    assert load(target)[1]["train_state"] is None


def test_failure_between_the_renames_restores_the_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    old_model = tiny_model(seed=3)
    save(old_model, target)
    real_rename, calls = checkpoint.os.rename, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("crash after moving the old checkpoint aside")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", second_rename_fails)
    with pytest.raises(KeyboardInterrupt):
        save(tiny_model(seed=4), target)
    monkeypatch.undo()
    loaded, _ = load(target)
    assert all(torch.equal(a, b) for a, b in zip(old_model.state_dict().values(), loaded.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_load_names_what_a_hard_crash_left_behind(tmp_path):
    save(tiny_model(seed=3), tmp_path / "ck")
    (tmp_path / "ck").rename(tmp_path / ".ck.0123.old")  # as a power cut between the two renames leaves it
    with pytest.raises(FileNotFoundError, match=r"interrupted save left \.ck\.0123\.old"):
        load(tmp_path / "ck")


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a fastsft checkpoint"):
        save(tiny_model(), tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_load_rejects_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="format 'other'"):
        load(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# nanochat


def test_load_nanochat_picks_latest_step_and_strips_compile_prefix(tmp_path, shared_data):
    src = shared_data / "nanochat" / "master"
    state = torch.load(src / "model_000000.pt", weights_only=True)
    shutil.copy(src / "model_000000.pt", tmp_path / "model_000000.pt")
    shutil.copy(src / "meta_000000.json", tmp_path / "meta_000000.json")
    perturbed = {"_orig_mod." + k: v + 1 if k == "lm_head.weight" else v for k, v in state.items()}
    torch.save(perturbed, tmp_path / "model_000120.pt")
    shutil.copy(src / "meta_000000.json", tmp_path / "meta_000120.json")
    latest = load_nanochat(tmp_path)
    assert torch.equal(latest.lm_head.weight, state["lm_head.weight"] + 1)
    first = load_nanochat(tmp_path, step=0)
    assert torch.equal(first.lm_head.weight, state["lm_head.weight"])
    assert first.config.ve_gate_channels == 12 and first.config.smear_channels == 24
    assert load_nanochat(tmp_path, step=0, config_overrides={"rope_base": 5e5}).config.rope_base == 5e5
    with pytest.raises(ValueError, match="no fields"):
        load_nanochat(tmp_path, step=0, config_overrides={"rope_theta": 5e5})


def test_load_nanochat_names_unknown_config_keys_and_weights(tmp_path, shared_data):
    src = shared_data / "nanochat" / "seed"
    shutil.copy(src / "model_000000.pt", tmp_path / "model_000000.pt")
    meta = json.loads((src / "meta_000000.json").read_text())
    meta["model_config"]["n_experts"] = 8
    (tmp_path / "meta_000000.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"n_experts"):
        load_nanochat(tmp_path)
    del meta["model_config"]["n_experts"]
    (tmp_path / "meta_000000.json").write_text(json.dumps(meta))
    state = torch.load(src / "model_000000.pt", weights_only=True)
    state["transformer.h.0.attn.c_gate.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "model_000000.pt")
    with pytest.raises(ValueError, match=r"unexpected \['transformer.h.0.attn.c_gate.weight'\]"):
        load_nanochat(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model_XXXXXX.pt"):
        load_nanochat(empty)
    with pytest.raises(FileNotFoundError, match="model_000007.pt"):
        load_nanochat(tmp_path, step=7)


class _Boom:
    """Unpickling this creates a marker file: proof that the file was (or was not) unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tokenizer_pickle_is_refused_without_trust(tmp_path):
    marker = tmp_path / "unpickled"
    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(PermissionError, match="arbitrary code"):
        import_nanochat_tokenizer(pkl)
    assert not marker.exists()


def test_tokenizer_pickle_converts_with_trust(tmp_path):
    from fastsft.tokenizer import Tokenizer

    ranks = {bytes([b]): b for b in range(256)}
    for pair in (b"he", b"ll", b"hell", b"o ", b"hello "):
        ranks[pair] = len(ranks)
    encoding = types.SimpleNamespace(_mergeable_ranks=ranks, _pat_str=r"""\w+\s?|[^\w\s]+|\s+""")
    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(pickle.dumps(encoding))
    tok = import_nanochat_tokenizer(pkl, trust_pickle=True, save_to=tmp_path / "tokenizer.json")
    assert tok.encode("hello ") == [ranks[b"hello "]]
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("hello hello ") == [ranks[b"hello "]] * 2
