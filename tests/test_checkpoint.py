"""Checkpoints: exact save/load round trips without pickle, atomic writes, nanochat import and its pickle refusal."""

import json
import pickle
import random
import re
import shutil
import textwrap
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


def test_save_refuses_to_delete_files_a_user_put_into_a_checkpoint(tmp_path):
    ck = save(tiny_model(), tmp_path / "ck")
    (ck / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"also holds \['notes.txt'\], which replacing it would delete"):
        save(tiny_model(seed=1), ck)
    assert (ck / "notes.txt").read_text() == "mine"
    (ck / "notes.txt").unlink()
    save(tiny_model(seed=1), ck)  # its own files only: replaced


def test_save_refuses_what_is_not_a_fastsft_checkpoint_and_takes_an_empty_directory(tmp_path):
    other = tmp_path / "hf_model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a config.json, not ours
    with pytest.raises(FileExistsError, match="not a fastsft checkpoint"):
        save(tiny_model(), other)
    assert json.loads((other / "config.json").read_text()) == {"model_type": "llama"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save(tiny_model(), tmp_path / "file")
    (tmp_path / "empty").mkdir()
    load(save(tiny_model(), tmp_path / "empty"))


KILLED_SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from fastsft import checkpoint
    from fastsft.model import GPT, GPTConfig

    target, where = sys.argv[1], sys.argv[2]
    model = GPT(GPTConfig(sequence_len=32, vocab_size=75, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    model.init_weights()
    if where == "while_writing":  # the model file is half written into the staging directory
        def dies(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_file = dies
    else:  # between the renames: the old checkpoint moved aside, the new one still in staging
        real_rename, calls = os.rename, []
        def rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)
        checkpoint.os.rename = rename
    checkpoint.save(model, target)
""")


@pytest.mark.parametrize("where", ["while_writing", "between_the_renames"])
def test_a_save_killed_with_sigkill_leaves_leftovers_the_next_save_removes(tmp_path, where):
    import signal
    import subprocess
    import sys

    target = tmp_path / "ck"
    first = tiny_model(seed=1)
    save(first, target)
    (tmp_path / ".ck.mine.tmp").mkdir()  # not of our making (no 32-hex tag): never touched
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE_SCRIPT, str(target), where], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.") and p.name != ".ck.mine.tmp")
    if where == "while_writing":
        assert [name[-4:] for name in leftovers] == [".tmp"]
        loaded, _ = load(target)  # the old checkpoint, whole
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), loaded.state_dict().values()))
    else:
        assert sorted(name[-4:] for name in leftovers) == [".old", ".tmp"] and not target.exists()
        with pytest.raises(FileNotFoundError, match="interrupted save left"):
            load(target)
    second = tiny_model(seed=2)
    save(second, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.mine.tmp", "ck"]
    loaded, _ = load(target)
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), loaded.state_dict().values()))


def test_load_rejects_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="format 'other'"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="format None"):
        load(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Malformed, corrupt or mismatched files: each error names the file and the field or tensor


def edit_config(ck, edit):
    header = json.loads((ck / "config.json").read_text())
    edit(header)
    (ck / "config.json").write_text(json.dumps(header))  # NaN stays NaN (json's default allow_nan)


@pytest.mark.parametrize("field, value, message", [
    ("qk_scale", "false", r"GPTConfig.qk_scale must be true or false, got 'false' \(str\)"),
    ("short_window", True, r"GPTConfig.short_window must be an integer, got True"),
    ("softcap", float("nan"), r"GPTConfig.softcap must be a finite number > 0, got nan"),
    ("rope_base", 0, r"GPTConfig.rope_base must be a finite number > 0, got 0.0"),
    ("n_layer", "2", r"GPTConfig.n_layer must be an integer, got '2'"),
    ("n_experts", 8, r"GPTConfig has no fields \['n_experts'\]"),
])
def test_config_fields_are_type_and_range_checked_naming_file_and_field(tmp_path, field, value, message):
    ck = save(tiny_model(), tmp_path / "ck")
    edit_config(ck, lambda h: h["config"].__setitem__(field, value))
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"load: {ck / 'config.json'}: ") + message):
        load(ck)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["config"].pop("qk_scale"), r"'config' lacks the fields \['qk_scale'\]"),
    (lambda h: h.__setitem__("config", [1]), "'config' must be an object of GPTConfig fields, got list"),
    (lambda h: h.__setitem__("meta", "x"), "'meta' must be an object"),
    (lambda h: h.pop("checksums"), "'checksums' must be an object, got NoneType"),
    (lambda h: h["checksums"].__setitem__("notes.txt", {"sha256": "0"}), r"not part of a checkpoint: \['notes.txt'\]"),
    (lambda h: h["checksums"][checkpoint.MODEL_FILE].pop("tensors_sha256"), "malformed checksum entry for model"),
])
def test_malformed_config_json_is_named(tmp_path, edit, message):
    ck = save(tiny_model(), tmp_path / "ck")
    edit_config(ck, edit)
    with pytest.raises(checkpoint.CheckpointError, match=message) as error:
        load(ck)
    assert str(ck / "config.json") in str(error.value)


def test_config_json_that_is_not_json_is_named(tmp_path):
    ck = save(tiny_model(), tmp_path / "ck")
    (ck / "config.json").write_text((ck / "config.json").read_text()[:50])
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{ck / 'config.json'} is not valid JSON")):
        load(ck)


def rewrite_weights(ck, change):
    """Replace model.safetensors by change(tensors), with checksums that match (as a foreign tool would write it),
    so that the checks after the checksum are the ones that speak."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ck / checkpoint.MODEL_FILE)
    change(tensors)
    save_file(tensors, ck / checkpoint.MODEL_FILE)
    entry = checkpoint._tensor_file_checksums(ck / checkpoint.MODEL_FILE, tensors)
    edit_config(ck, lambda h: h["checksums"].__setitem__(checkpoint.MODEL_FILE, entry))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_weights_of_a_dtype_a_model_does_not_use_are_refused(tmp_path, dtype):
    ck = save(tiny_model(), tmp_path / "ck")
    rewrite_weights(ck, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"].to(dtype)))
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"model.safetensors: tensor 'lm_head.weight' is {dtype}; weights must be one of "
                             r"torch.float32, torch.bfloat16, torch.float16"):
        load(ck)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    ck = save(tiny_model(), tmp_path / "ck")
    rewrite_weights(ck, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"][:, :-1].contiguous()))
    with pytest.raises(checkpoint.CheckpointError, match=r"tensor 'lm_head.weight' has shape \(128, 63\), the "
                                                         r"config in config.json makes it \(128, 64\)"):
        load(ck)
    rewrite_weights(ck, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['lm_head.weight'\], unexpected \[\]"):
        load(ck)


def flip_bit(file, offset, bit=3):
    data = bytearray(file.read_bytes())
    data[offset] ^= 1 << bit
    file.write_bytes(bytes(data))


def tensor_offset(file, name):
    """Byte offset of tensor `name`'s data in a safetensors file (8-byte length, JSON header, data)."""
    length = int.from_bytes(file.read_bytes()[:8], "little")
    header = json.loads(file.read_bytes()[8:8 + length])
    return 8 + length + header[name]["data_offsets"][0]


def test_a_flipped_bit_is_named(tmp_path):
    from fastsft.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["a flipped bit in a checkpoint"] * 10, vocab_size=280)
    src = save(tiny_model(), tmp_path / "src", tokenizer=tok, train_state={"m": torch.arange(6.0), "step": 3})
    cases = [
        (checkpoint.MODEL_FILE, lambda f: tensor_offset(f, "transformer.h.1.attn.c_k.weight") + 5,
         r"model.safetensors: tensor 'transformer.h.1.attn.c_k.weight' does not match its checksum"),
        (checkpoint.MODEL_FILE, lambda f: 20, r"model.safetensors: its header .* does not match its checksum"),
        (checkpoint.STATE_TENSORS_FILE, lambda f: tensor_offset(f, "t0"),
         r"train_state.safetensors: tensor 't0' does not match its checksum"),
        (checkpoint.TOKENIZER_FILE, lambda f: 40, r"tokenizer.json does not match its checksum"),
        (checkpoint.STATE_JSON_FILE, lambda f: 12, r"train_state.json does not match its checksum"),
    ]
    for i, (name, offset, message) in enumerate(cases):
        ck = tmp_path / f"ck{i}"
        shutil.copytree(src, ck)
        flip_bit(ck / name, offset(ck / name))
        with pytest.raises(checkpoint.CheckpointError, match=message):
            load(ck)
    load(src)  # the untouched copy loads


def test_missing_truncated_and_stray_files_are_named(tmp_path):
    from fastsft.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(["stray files"] * 10, vocab_size=270)
    ck = save(tiny_model(), tmp_path / "ck", tokenizer=tok)
    (ck / checkpoint.TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json not found \(listed in .*config.json\)"):
        load(ck)
    ck = save(tiny_model(), tmp_path / "ck")  # without a tokenizer: one copied in is not part of this save
    (ck / checkpoint.TOKENIZER_FILE).write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match=r"tokenizer.json is not listed in .*config.json"):
        load(ck)
    (ck / checkpoint.TOKENIZER_FILE).unlink()
    model_file = ck / checkpoint.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:-100])  # the header intact, the data cut short
    with pytest.raises(checkpoint.CheckpointError, match=r"model.safetensors cannot be read"):
        load(ck)


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
