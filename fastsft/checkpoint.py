"""Checkpoints: fastsft's own directory format, and import of nanochat's checkpoints.

fastsft's format (a directory), readable without unpickling anything:
  model.safetensors        the model's state_dict
  config.json              {"format": "fastsft", "version": 1, "config": GPTConfig fields, "meta": {...}}
  tokenizer.json           optional (fastsft.tokenizer.Tokenizer.save)
  train_state.safetensors  optional: every tensor of the training state (optimizer states, RNG states, ...)
  train_state.json         optional: the rest of the training state (step, data position, hyperparameters), with
                           placeholders where tensors, tuples, non-string dict keys and numpy arrays were
The directory is written as a whole: every file goes into a temporary sibling directory (fsync'd), which is then
renamed onto the checkpoint's name, so a reader sees the complete old checkpoint or the complete new one, never a
mix of files from two saves and never a stale optional file from an earlier save. Replacing an existing
checkpoint takes two renames (old aside, new in place); an exception between them puts the old one back, and a
hard crash there leaves the new checkpoint complete in `.NAME.*.tmp` and the old one in `.NAME.*.old` beside
it, which load() names in its error.

nanochat's format: model_XXXXXX.pt (a plain state_dict, torch.save) + meta_XXXXXX.json ({"model_config": ...}) in
one directory, and its tokenizer as tokenizer.pkl (a pickled tiktoken Encoding), which is only unpickled when the
caller says it trusts the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fastsft.model import GPT, GPTConfig

FORMAT_NAME = "fastsft"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_JSON_FILE = "train_state.json"


# ----------------------------------------------------------------------------------------------------------------
# Atomic file writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) for a temporary file beside `path`, fsync it, then os.replace it onto `path`.

    If write raises, the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, data) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=True)

    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------------
# Training state: nested Python data with tensors -> (JSON-able tree, {key: tensor})


def _encode(obj, tensors: dict, where: str):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        # As raw bytes: safetensors lacks some numpy dtypes (e.g. the uint32 of numpy's RNG state).
        tensors[key] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(obj).tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, where)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"train_state{where}: dict key {k!r} of type {type(k).__name__} cannot be saved")
            items.append([k, _encode(v, tensors, f"{where}[{k!r}]")])
        return {"__items__": items}
    raise TypeError(f"train_state{where}: cannot save a {type(obj).__name__} without pickle; "
                    "use tensors, numbers, strings, lists, tuples and dicts")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            raw = tensors[obj["__ndarray__"]].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and (if present) CUDA RNG states, in a form save() can write."""
    import random

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state (after a save/load round trip)."""
    import random

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ----------------------------------------------------------------------------------------------------------------
# fastsft's own format


def save(model: GPT, path: str | os.PathLike, tokenizer=None, train_state: dict | None = None,
         meta: dict | None = None) -> Path:
    """Write a checkpoint directory (created if needed); returns its path.

    model: a GPT (or a compiled / DDP wrapper of one). tokenizer: any object with .save(path) writing a
    tokenizer.json. train_state: nested dicts/lists/tuples of tensors, numpy arrays, numbers and strings (e.g.
    {"step": 100, "optimizers": [opt.state_dict()], "rng": capture_rng_state(), "data": {...}}); no pickle.
    meta: small JSON-able extras kept in config.json.
    """
    path = Path(path)
    model = _unwrap(model)
    if not isinstance(model, GPT):
        raise TypeError(f"save: expected a fastsft GPT, got {type(model).__name__}")
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise FileExistsError(f"save: {path} exists and is not a fastsft checkpoint; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    staging = path.with_name(f".{path.name}.{tag}.tmp")
    staging.mkdir()
    try:
        _write_checkpoint_files(staging, model, tokenizer, train_state, meta)
        _fsync_dir(staging)
        if path.exists():
            retired = path.with_name(f".{path.name}.{tag}.old")
            os.rename(path, retired)
            try:
                os.rename(staging, path)
            except BaseException:
                os.rename(retired, path)  # an exception (not a power cut) puts the old checkpoint back
                raise
            shutil.rmtree(retired)
        else:
            os.rename(staging, path)
        _fsync_dir(path.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def _write_checkpoint_files(path: Path, model: GPT, tokenizer, train_state, meta) -> None:
    state = {k.removeprefix("_orig_mod."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / MODEL_FILE, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT_NAME}))
    if tokenizer is not None:
        atomic_write(path / TOKENIZER_FILE, lambda tmp: tokenizer.save(str(tmp)))
    if train_state is not None:
        tensors: dict = {}
        tree = _encode(train_state, tensors, "")
        atomic_write(path / STATE_TENSORS_FILE, lambda tmp: save_file(tensors, tmp))
        _write_json(path / STATE_JSON_FILE, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "state": tree})
    _write_json(path / CONFIG_FILE, {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                     "config": model.config.to_dict(), "meta": meta or {}})


def load(path: str | os.PathLike, device="cpu") -> tuple[GPT, dict]:
    """Read a checkpoint directory written by save(); nothing is unpickled.

    Returns (model, extras) with extras = {"config": GPTConfig, "meta": dict, "tokenizer": fastsft Tokenizer or
    None, "train_state": the saved training state (tensors on the CPU) or None}.
    """
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.*")) if path.parent.is_dir() else []
        hint = f" (an interrupted save left {', '.join(leftovers)} beside it)" if leftovers else ""
        raise FileNotFoundError(f"load: {config_path} not found; is {path} a fastsft checkpoint directory?{hint}")
    with open(config_path, encoding="utf-8") as f:
        header = json.load(f)
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        raise ValueError(f"load: {config_path} is format {header.get('format')!r} version {header.get('version')!r}, "
                         f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}")
    config = GPTConfig.from_dict(header["config"])
    model = GPT.from_state_dict(config, load_file(path / MODEL_FILE), device=device)
    tokenizer = None
    if (path / TOKENIZER_FILE).is_file():
        from fastsft.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE)
    train_state = None
    if (path / STATE_JSON_FILE).is_file():
        with open(path / STATE_JSON_FILE, encoding="utf-8") as f:
            tree = json.load(f)["state"]
        train_state = _decode(tree, load_file(path / STATE_TENSORS_FILE))
    return model, {"config": config, "meta": header.get("meta", {}), "tokenizer": tokenizer,
                   "train_state": train_state}


def _unwrap(model):
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------------------------------------------
# nanochat


NANOCHAT_CONFIG_KEYS = frozenset({"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                                  "window_pattern"})


def find_last_step(checkpoint_dir: str | os.PathLike) -> int:
    """The largest XXXXXX of the model_XXXXXX.pt files in checkpoint_dir."""
    steps = [int(m.group(1)) for p in Path(checkpoint_dir).iterdir()
             if (m := re.fullmatch(r"model_(\d+)\.pt", p.name))]
    if not steps:
        raise FileNotFoundError(f"no model_XXXXXX.pt checkpoint in {checkpoint_dir}")
    return max(steps)


def nanochat_config(model_config: dict, state_dict: dict) -> GPTConfig:
    """GPTConfig for a nanochat checkpoint: shapes from meta's model_config, era features from the weight names.

    2026 features (value embeddings, resid/x0 lambdas, smear, backout) are switched on by their parameters being
    present; RoPE base 100000, q/k scaling and the padded vocab came with them, base 10000 before.
    """
    unknown = sorted(set(model_config) - NANOCHAT_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"nanochat model_config has keys fastsft does not know: {unknown} "
                         f"(known: {sorted(NANOCHAT_CONFIG_KEYS)})")
    missing = sorted(NANOCHAT_CONFIG_KEYS - {"window_pattern"} - set(model_config))
    if missing:
        raise ValueError(f"nanochat model_config lacks {missing}")
    keys = set(state_dict)
    value_embeds = any(k.startswith("value_embeds.") for k in keys)
    lambdas = "resid_lambdas" in keys
    smear = "smear_gate.weight" in keys
    backout = "backout_lambda" in keys
    new_era = value_embeds or lambdas or smear or backout
    vocab = model_config["vocab_size"]
    rows = state_dict["transformer.wte.weight"].shape[0]
    extra = {}
    ve_gates = [k for k in keys if k.endswith("attn.ve_gate.weight")]
    if ve_gates:
        extra["ve_gate_channels"] = int(state_dict[ve_gates[0]].shape[1])
    if smear:
        extra["smear_channels"] = int(state_dict["smear_gate.weight"].shape[1])
    return GPTConfig(
        **{k: model_config[k] for k in NANOCHAT_CONFIG_KEYS - {"window_pattern"}},
        window_pattern=model_config.get("window_pattern", "L"),
        rope_base=100000.0 if new_era else 10000.0,
        softcap=15.0,
        value_embeds=value_embeds, resid_lambdas=lambdas, smear=smear, backout=backout, qk_scale=new_era,
        pad_vocab_to=64 if rows != vocab or new_era else 1,
        **extra,
    )


def load_nanochat(checkpoint_dir: str | os.PathLike, step: int | None = None, device="cpu",
                  dtype: torch.dtype | None = torch.float32, config_overrides: dict | None = None) -> GPT:
    """Build a GPT from nanochat's model_XXXXXX.pt + meta_XXXXXX.json (step None = the latest).

    Weights are read with torch.load(weights_only=True) (no arbitrary unpickling), `_orig_mod.` prefixes of
    compiled models are stripped, and tensors are cast to `dtype` (None keeps them as saved). The era is read
    from the weight names (see nanochat_config); config_overrides (GPTConfig fields) correct what names cannot
    tell, e.g. rope_base or qk_scale of a checkpoint from between the two eras tested here.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_path = checkpoint_dir / f"model_{step:06d}.pt"
    meta_path = checkpoint_dir / f"meta_{step:06d}.json"
    for p in (model_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_nanochat: {p} not found")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if "model_config" not in meta:
        raise ValueError(f"load_nanochat: {meta_path} has no 'model_config'")
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = nanochat_config(meta["model_config"], state)
    if config_overrides:
        config = GPTConfig.from_dict({**config.to_dict(), **config_overrides})
    return GPT.from_state_dict(config, state, device=device)


def import_nanochat_tokenizer(pkl_path: str | os.PathLike, trust_pickle: bool = False, save_to=None):
    """Convert nanochat's tokenizer.pkl (a pickled tiktoken Encoding) to a fastsft Tokenizer.

    Unpickling runs arbitrary code from the file, so it happens only with trust_pickle=True. The ordinary ranks
    and split pattern carry over (ids equal ranks); the special tokens are fastsft's, appended after them.
    save_to: optionally also write the result as tokenizer.json there.
    """
    if not trust_pickle:
        raise PermissionError(
            f"refusing to unpickle {pkl_path}: a pickle can run arbitrary code when loaded. If you trust this file, "
            "call import_nanochat_tokenizer(..., trust_pickle=True); the result is saved as tokenizer.json, which "
            "loads without pickle from then on")
    import pickle

    with open(pkl_path, "rb") as f:
        encoding = pickle.load(f)  # noqa: S301 - the caller vouched for the file
    ranks = getattr(encoding, "_mergeable_ranks", None)
    pattern = getattr(encoding, "_pat_str", None)
    if ranks is None or pattern is None:
        raise TypeError(f"{pkl_path} does not hold a tiktoken Encoding (no _mergeable_ranks / _pat_str)")
    from fastsft.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_mergeable_ranks(dict(ranks), pattern)
    if save_to is not None:
        atomic_write(Path(save_to), lambda tmp: tokenizer.save(str(tmp)))
    return tokenizer
