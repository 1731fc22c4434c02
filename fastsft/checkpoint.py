"""Checkpoints: fastsft's own directory format, and import of nanochat's checkpoints.

fastsft's format (a directory), readable without unpickling anything:
  model.safetensors        the model's state_dict (float32, bfloat16 or float16 tensors)
  config.json              {"format": "fastsft", "version": 2, "config": every GPTConfig field, "meta": {...},
                            "checksums": {file: ...} for every other file of the checkpoint}
  tokenizer.json           optional (fastsft.tokenizer.Tokenizer.save)
  train_state.safetensors  optional: every tensor of the training state (optimizer states, RNG states, ...)
  train_state.json         optional: the rest of the training state (step, data position, hyperparameters), with
                           placeholders where tensors, tuples, non-string dict keys and numpy arrays were
Checksums (SHA-256): a tensor file has one for its header and one per tensor, so a flipped bit is found and named
(the tensor, or the header) while the data is hashed once, as it is loaded; other files one for the whole file.
load() checks them, the config's types and ranges (GPTConfig), and every weight's name, shape and dtype against the
config, and names the file and the field or tensor in every error.

The directory is written as a whole: every file goes into a temporary sibling directory (fsync'd), which is then
renamed onto the checkpoint's name, so a reader sees the complete old checkpoint or the complete new one, never a
mix of files from two saves and never a stale optional file from an earlier save. Replacing an existing
checkpoint takes two renames (old aside, new in place); an exception between them puts the old one back, and a
hard crash there leaves the new checkpoint complete in `.NAME.*.tmp` and the old one in `.NAME.*.old` beside
it, which load() names in its error. The next save removes such leftovers of earlier saves (the process that made
them is gone: one writer per checkpoint path), before writing when the checkpoint itself is whole, else after.
save() replaces only an empty directory or a fastsft checkpoint holding nothing but its own files: a directory
with anything else in it is refused, not deleted.

nanochat's format: model_XXXXXX.pt (a plain state_dict, torch.save) + meta_XXXXXX.json ({"model_config": ...}) in
one directory, and its tokenizer as tokenizer.pkl (a pickled tiktoken Encoding), which is only unpickled when the
caller says it trusts the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastsft.model import GPT, GPTConfig

FORMAT_NAME = "fastsft"
FORMAT_VERSION = 2  # 2: checksums in config.json
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_JSON_FILE = "train_state.json"
CHECKPOINT_FILES = frozenset({MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE})
# Weights are kept in these; float64 would silently turn the model fp64, integers are not weights.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HASH_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and what is wrong in it."""


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
# Checksums


def _sha256_of_tensor(tensor: torch.Tensor) -> str:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def _safetensors_header(path: Path) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file: names, dtypes, shapes and offsets."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        return prefix + f.read(min(length, size))  # a corrupt length must not make us read gigabytes


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_file_checksums(path: Path, tensors: dict) -> dict:
    return {"header_sha256": hashlib.sha256(_safetensors_header(path)).hexdigest(),
            "tensors_sha256": {name: _sha256_of_tensor(t) for name, t in tensors.items()}}


# ----------------------------------------------------------------------------------------------------------------
# fastsft's own format: save


def save(model: GPT, path: str | os.PathLike, tokenizer=None, train_state: dict | None = None,
         meta: dict | None = None) -> Path:
    """Write a checkpoint directory (created if needed); returns its path.

    model: a GPT (or a compiled / DDP wrapper of one). tokenizer: any object with .save(path) writing a
    tokenizer.json. train_state: nested dicts/lists/tuples of tensors, numpy arrays, numbers and strings (e.g.
    {"step": 100, "optimizers": [opt.state_dict()], "rng": capture_rng_state(), "data": {...}}); no pickle.
    meta: small JSON-able extras kept in config.json.
    An existing `path` is replaced only if it is empty or a fastsft checkpoint with nothing else in it
    (FileExistsError otherwise); leftovers of earlier interrupted saves to `path` are removed.
    """
    path = Path(path)
    model = _unwrap(model)
    if not isinstance(model, GPT):
        raise TypeError(f"save: expected a fastsft GPT, got {type(model).__name__}")
    whole = _replaceable_checkpoint(path)
    leftovers = _leftovers(path)
    if whole:  # the checkpoint itself is intact: the leftovers are garbage, free their space before writing
        _remove_leftovers(leftovers)
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
    if not whole:  # a leftover may have held the only complete copy: removed once the new checkpoint is in place
        _remove_leftovers(leftovers)
    return path


def _replaceable_checkpoint(path: Path) -> bool:
    """True if `path` is a fastsft checkpoint that save() may replace, False if it is absent or an empty
    directory; FileExistsError for anything else, so that no file of the user's is deleted."""
    if path.is_symlink():
        raise FileExistsError(f"save: {path} is a symbolic link; save to the directory it points to instead")
    if not path.exists():
        return False
    if not path.is_dir():
        raise FileExistsError(f"save: {path} exists and is not a directory; refusing to replace it")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return False
    if CONFIG_FILE not in entries or not _is_fastsft_config(path / CONFIG_FILE):
        raise FileExistsError(f"save: {path} exists and is not a fastsft checkpoint (no fastsft {CONFIG_FILE} in "
                              "it); refusing to replace it")
    foreign = [name for name in entries if name not in CHECKPOINT_FILES]
    if foreign:
        raise FileExistsError(f"save: {path} is a fastsft checkpoint but also holds {foreign}, which replacing it "
                              "would delete; move them out or save elsewhere")
    return True


def _is_fastsft_config(config_path: Path) -> bool:
    try:
        with open(config_path, encoding="utf-8") as f:
            header = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT_NAME


def _leftovers(path: Path) -> list[Path]:
    """Staging (.tmp) and retired (.old) directories of earlier saves to `path` whose process died mid-save."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.(tmp|old)")
    return sorted(p for p in path.parent.iterdir()
                  if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _remove_leftovers(leftovers: list[Path]) -> None:
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)  # best effort: a leftover that stays is named by load()


def _write_checkpoint_files(path: Path, model: GPT, tokenizer, train_state, meta) -> None:
    checksums = {}
    state = {k.removeprefix("_orig_mod."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / MODEL_FILE, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT_NAME}))
    checksums[MODEL_FILE] = _tensor_file_checksums(path / MODEL_FILE, state)
    if tokenizer is not None:
        atomic_write(path / TOKENIZER_FILE, lambda tmp: tokenizer.save(str(tmp)))
        checksums[TOKENIZER_FILE] = {"sha256": _sha256_of_file(path / TOKENIZER_FILE)}
    if train_state is not None:
        tensors: dict = {}
        tree = _encode(train_state, tensors, "")
        atomic_write(path / STATE_TENSORS_FILE, lambda tmp: save_file(tensors, tmp))
        checksums[STATE_TENSORS_FILE] = _tensor_file_checksums(path / STATE_TENSORS_FILE, tensors)
        _write_json(path / STATE_JSON_FILE, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "state": tree})
        checksums[STATE_JSON_FILE] = {"sha256": _sha256_of_file(path / STATE_JSON_FILE)}
    _write_json(path / CONFIG_FILE, {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                     "config": model.config.to_dict(), "meta": meta or {}, "checksums": checksums})


# ----------------------------------------------------------------------------------------------------------------
# fastsft's own format: load


def load(path: str | os.PathLike, device="cpu") -> tuple[GPT, dict]:
    """Read a checkpoint directory written by save(); nothing is unpickled.

    Returns (model, extras) with extras = {"config": GPTConfig, "meta": dict, "tokenizer": fastsft Tokenizer or
    None, "train_state": the saved training state (tensors on the CPU) or None}.
    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) naming the file and the field,
    tensor or checksum for anything malformed, corrupt, or not matching the config.
    """
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.*")) if path.parent.is_dir() else []
        hint = f" (an interrupted save left {', '.join(leftovers)} beside it)" if leftovers else ""
        raise FileNotFoundError(f"load: {config_path} not found; is {path} a fastsft checkpoint directory?{hint}")
    header = _read_json(config_path)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        found = (header.get("format"), header.get("version")) if isinstance(header, dict) else (None, None)
        raise CheckpointError(f"load: {config_path} is format {found[0]!r} version {found[1]!r}, expected "
                              f"{FORMAT_NAME!r} version {FORMAT_VERSION}")
    config = _config_from_header(header, config_path)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"load: {config_path}: 'meta' must be an object, got {type(meta).__name__}")
    checksums = _checksums_from_header(header, path, config_path)

    state = _read_tensor_file(path / MODEL_FILE, checksums[MODEL_FILE], config_path)
    _check_weights(state, config, path / MODEL_FILE)
    model = GPT.from_state_dict(config, state, device=device)

    tokenizer = None
    if TOKENIZER_FILE in checksums:
        _verify_file(path / TOKENIZER_FILE, checksums[TOKENIZER_FILE], config_path)
        from fastsft.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(path / TOKENIZER_FILE)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise CheckpointError(f"load: {path / TOKENIZER_FILE} cannot be read as a tokenizer: {e}") from e
    train_state = None
    if STATE_JSON_FILE in checksums:
        _verify_file(path / STATE_JSON_FILE, checksums[STATE_JSON_FILE], config_path)
        document = _read_json(path / STATE_JSON_FILE)
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME or "state" not in document:
            raise CheckpointError(f"load: {path / STATE_JSON_FILE} is not a fastsft training state")
        tensors = _read_tensor_file(path / STATE_TENSORS_FILE, checksums[STATE_TENSORS_FILE], config_path)
        try:
            train_state = _decode(document["state"], tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"load: {path / STATE_JSON_FILE}: malformed training state ({e!r})") from e
    return model, {"config": config, "meta": meta, "tokenizer": tokenizer, "train_state": train_state}


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"load: {path} is not valid JSON ({type(e).__name__}: {e})") from e


def _config_from_header(header: dict, config_path: Path) -> GPTConfig:
    fields = header.get("config")
    if not isinstance(fields, dict):
        raise CheckpointError(f"load: {config_path}: 'config' must be an object of GPTConfig fields, got "
                              f"{type(fields).__name__}")
    # Every field, written by save(): a default filled in for a missing one could change the architecture.
    missing = sorted({f.name for f in dataclasses.fields(GPTConfig)} - set(fields))
    if missing:
        raise CheckpointError(f"load: {config_path}: 'config' lacks the fields {missing}")
    try:
        return GPTConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"load: {config_path}: {e}") from e


def _checksums_from_header(header: dict, path: Path, config_path: Path) -> dict:
    """The checksum entries of config.json, after checking that they list exactly the files the directory holds
    (a file without an entry was put there by something else than save())."""
    checksums = header.get("checksums")
    if not isinstance(checksums, dict):
        raise CheckpointError(f"load: {config_path}: 'checksums' must be an object, got {type(checksums).__name__}")
    unknown = sorted(set(checksums) - (CHECKPOINT_FILES - {CONFIG_FILE}))
    if unknown:
        raise CheckpointError(f"load: {config_path}: 'checksums' lists files that are not part of a checkpoint: "
                              f"{unknown}")
    if MODEL_FILE not in checksums:
        raise CheckpointError(f"load: {config_path}: 'checksums' lacks {MODEL_FILE}")
    if (STATE_JSON_FILE in checksums) != (STATE_TENSORS_FILE in checksums):
        raise CheckpointError(f"load: {config_path}: 'checksums' lists only one of {STATE_JSON_FILE} and "
                              f"{STATE_TENSORS_FILE}")
    for name in sorted(CHECKPOINT_FILES - {CONFIG_FILE}):
        if name in checksums and not (path / name).is_file():
            raise FileNotFoundError(f"load: {path / name} not found (listed in {config_path})")
        if name not in checksums and (path / name).exists():
            raise CheckpointError(f"load: {path / name} is not listed in {config_path}: it was not written by the "
                                  "save that wrote the checkpoint")
    return checksums


def _verify_file(file: Path, entry, config_path: Path) -> None:
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)):
        raise CheckpointError(f"load: {config_path}: malformed checksum entry for {file.name}: {entry!r}")
    if _sha256_of_file(file) != entry["sha256"]:
        raise CheckpointError(f"load: {file} does not match its checksum in {config_path}: the file is corrupt or "
                              "was changed after the save")


def _read_tensor_file(file: Path, entry, config_path: Path) -> dict:
    """The tensors of `file`, each checked against its checksum (the header's first, so a damaged header is named
    as such and never parsed into wrong shapes or offsets)."""
    if not (isinstance(entry, dict) and isinstance(entry.get("header_sha256"), str)
            and isinstance(entry.get("tensors_sha256"), dict)):
        raise CheckpointError(f"load: {config_path}: malformed checksum entry for {file.name}")
    if hashlib.sha256(_safetensors_header(file)).hexdigest() != entry["header_sha256"]:
        raise CheckpointError(f"load: {file}: its header (tensor names, dtypes, shapes, offsets) does not match its "
                              f"checksum in {config_path}: the file is corrupt or was changed after the save")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:  # e.g. truncated after the header
        raise CheckpointError(f"load: {file} cannot be read: {e}") from e
    expected = entry["tensors_sha256"]
    if set(tensors) != set(expected):
        raise CheckpointError(f"load: {file}: tensors {sorted(set(tensors) ^ set(expected))} differ from those "
                              f"listed in {config_path}")
    for name, tensor in tensors.items():
        if _sha256_of_tensor(tensor) != expected[name]:
            raise CheckpointError(f"load: {file}: tensor {name!r} does not match its checksum in {config_path}: "
                                  "the file is corrupt (a flipped bit?) or was changed after the save")
    return tensors


def _check_weights(state: dict, config: GPTConfig, file: Path) -> None:
    """Names, shapes and dtypes of the weights against the model that the config describes."""
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"load: {file} does not fit the model of its {CONFIG_FILE}: missing {missing}, "
                              f"unexpected {unexpected}")
    for name, want in expected.items():
        got = state[name]
        if got.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"load: {file}: tensor {name!r} is {got.dtype}; weights must be one of "
                                  f"{', '.join(str(d) for d in WEIGHT_DTYPES)}")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"load: {file}: tensor {name!r} has shape {tuple(got.shape)}, the config in "
                                  f"{CONFIG_FILE} makes it {tuple(want.shape)}")


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
