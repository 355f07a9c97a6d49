"""Checkpoint directories in the official layout: config.json + model-0000N-of-0000M.safetensors shards +
model.safetensors.index.json, tensor names equal to our state-dict names.

Saving is atomic (a sibling temporary directory renamed into place). Loading is lazy — one tensor read at a
time through safetensors' memory map — so a checkpoint far larger than RAM loads into a model built on the
meta device; FP8 / FP4 tensors are dequantised on the way (formats in weight_formats.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError, ModelConfig
from .weight_formats import (FP4_BLOCK, FP8_BLOCK, HUB_QUANTIZATION_CONFIG, FormatError, dequant_fp4,
                             dequant_fp8_blocks, fp8_scale_block, official_storage, quant_fp4, quant_fp8_blocks)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

_PLAIN_FLOAT = {"F64", "F32", "F16", "BF16"}
_INTS = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}
_PACKED_FP4 = {"I8", "U8", "F4"}
_SCALE_DTYPES = {"F8_E8M0", "F32", "BF16"}
# the hub repeats the shared embedding / head inside each MTP block; the official convert.py drops them too
_SHARED_MTP_COPY = re.compile(r"^mtp\.\d+\.(emb\w*|head)\.")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the tensor and/or the file."""


# ============================================================================================== save
def save_state(state_dict: dict[str, torch.Tensor], path, config_dict: dict, fmt: str = "plain",
               max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json, safetensors shards and the index into directory `path` (replacing an existing
    checkpoint directory only once the new one is complete). fmt='plain' stores every tensor as it is;
    fmt='official' stores them as DeepSeek's hub files do (FP8 / FP4 + ue8m0 scales, bf16, fp32)."""
    if fmt not in ("plain", "official"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; choose 'plain' or 'official'")
    path = Path(path)
    config = dict(config_dict)
    expert_dtype = None
    if fmt == "official":
        config, expert_dtype = _official_config(config, path)
    sizes = {name: _stored_bytes(name, t, fmt, expert_dtype, path) for name, t in state_dict.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        weight_map, total = {}, 0
        for k, names in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = _encode_shard(state_dict, names, fmt, expert_dtype, path)
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.nbytes for t in tensors.values())
            weight_map.update({n: fname for n in tensors})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _official_config(config: dict, path: Path) -> tuple[dict, str | None]:
    """config.json as the hub has it: quantization_config (FP8 e4m3, ue8m0, 128x128) and expert_dtype
    ('fp4' unless the config already says otherwise); torch_dtype bfloat16."""
    if not config.get("quantization_config"):
        config["quantization_config"] = dict(HUB_QUANTIZATION_CONFIG)
        config["expert_dtype"] = config.get("expert_dtype") or "fp4"
    qc = config["quantization_config"]
    if list(qc.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])) != [FP8_BLOCK, FP8_BLOCK]:
        raise CheckpointError(f"{path}: quantization_config.weight_block_size {qc['weight_block_size']} is not "
                              f"supported; the official format uses [{FP8_BLOCK}, {FP8_BLOCK}]")
    config["torch_dtype"] = "bfloat16"
    try:
        ModelConfig.from_dict(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: fmt='official' needs a config the official FP8/FP4 numerics accept: {e}") \
            from None
    return config, config.get("expert_dtype") or qc.get("expert_dtype")


def _storage(name: str, t: torch.Tensor, fmt: str, expert_dtype: str | None) -> str:
    if fmt == "plain" or not t.is_floating_point():
        return "asis"
    return official_storage(name, expert_dtype)


def _stored_bytes(name: str, t: torch.Tensor, fmt: str, expert_dtype: str | None, path: Path) -> int:
    """Bytes `t` takes on disk (weight plus its scale), computed from the shape alone."""
    kind = _storage(name, t, fmt, expert_dtype)
    n = t.numel()
    if kind in ("fp8", "fp4") and t.dim() != 2:
        raise CheckpointError(f"tensor {name}: {kind.upper()} storage needs a 2-D weight, got shape "
                              f"{tuple(t.shape)} (writing {path})")
    if kind == "fp8":
        o, i = t.shape
        return n + -(-o // FP8_BLOCK) * -(-i // FP8_BLOCK)
    if kind == "fp4":
        if t.shape[1] % FP4_BLOCK:
            raise CheckpointError(f"tensor {name}: FP4 storage needs the input dim to be a multiple of "
                                  f"{FP4_BLOCK}, got shape {tuple(t.shape)} (writing {path})")
        return n // 2 + n // FP4_BLOCK
    return n * {"fp32": 4, "bf16": 2}.get(kind, t.element_size())


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy, in state-dict order; a tensor larger than max_bytes gets a shard of its own."""
    shards, cur, cur_bytes = [], [], 0
    for name, b in sizes.items():
        if cur and cur_bytes + b > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += b
    if cur or not shards:
        shards.append(cur)
    return shards


def _encode_shard(sd: dict[str, torch.Tensor], names: list[str], fmt: str, expert_dtype: str | None,
                  path: Path) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for name in names:
        t = sd[name].detach()
        if t.is_meta:
            raise CheckpointError(f"tensor {name} is on the meta device (no data to write to {path})")
        t = t.cpu()
        kind = _storage(name, t, fmt, expert_dtype)
        stem = name[: -len("weight")] if name.endswith("weight") else name + "."
        if kind == "fp8":
            out[name], out[stem + "scale"] = quant_fp8_blocks(t)
        elif kind == "fp4":
            out[name], out[stem + "scale"] = quant_fp4(t)
        else:
            t = t.to({"fp32": torch.float32, "bf16": torch.bfloat16}.get(kind, t.dtype)).contiguous()
            if t.untyped_storage().data_ptr() in seen or t.untyped_storage().nbytes() != t.nbytes:
                t = t.clone()                                  # safetensors refuses shared / partial storage
            seen.add(t.untyped_storage().data_ptr())
            out[name] = t
    return out


def _check_target(path: Path) -> None:
    """Only a checkpoint directory (or nothing) may be replaced: a typo must not wipe an unrelated folder."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (
            (path / CONFIG_FILE).exists() or any(path.glob("*.safetensors"))):
        raise CheckpointError(f"{path} is a non-empty directory without config.json or *.safetensors; "
                              f"refusing to replace it with a checkpoint")


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished temporary directory into place; an old checkpoint is moved aside first and
    deleted last (restored if the final rename fails)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ============================================================================================== load
@dataclass
class _Stored:
    """Where one model tensor lives in the checkpoint and how it is encoded."""
    raw: str                        # name in the file
    file: Path
    dtype: str                      # safetensors dtype string
    shape: tuple[int, ...]          # shape as stored (F4: logical, per safetensors)
    scale_raw: str | None = None
    scale_file: Path | None = None
    scale_dtype: str | None = None
    scale_shape: tuple[int, ...] | None = None
    kind: str = "plain"             # plain | int | fp8 | fp4
    block: tuple[int, int] | None = None


def load_state_into(model: nn.Module, path, dtype: torch.dtype = torch.float32, device="cpu",
                    progress: bool = True, prefix: str | tuple[str, ...] | None = None) -> None:
    """Fill `model` (parameters possibly on the meta device) from checkpoint directory `path`.

    Floating tensors become `dtype` on `device` (FP8 / FP4 dequantised), integer ones keep the model's dtype.
    Parameters / buffers on meta or with another dtype / device are replaced (requires_grad kept); matching
    ones are copied into in place, so optimisers holding them stay valid. Everything is checked against the
    file headers before any tensor is read. prefix: read only the tensors whose names start with it (or with
    one of them, e.g. "layers.3."); the others are left as they are (the whole checkpoint is still checked)."""
    with CheckpointReader(model, path, dtype=dtype, device=device) as reader:
        reader.load_into(model, reader.names(prefix), progress=progress)


class CheckpointReader:
    """A checkpoint matched against `model` from the file headers alone (names, dtypes, shapes, scales; any
    mismatch raises here), with the files kept open so that any subset of tensors can then be read — lazily,
    one tensor at a time through safetensors' memory map — and put into the model, and later dropped again:

        with CheckpointReader(model, path, dtype=torch.bfloat16, device="cuda") as ck:
            ck.load_into(model, ck.names("layers.0."))
            ...
            ck.unload(model, ck.names("layers.0."))        # back to the meta device: memory freed

    This is what layer-by-layer inspection of checkpoints larger than the device runs on."""

    def __init__(self, model: nn.Module, path, dtype: torch.dtype = torch.float32, device="cpu"):
        self.path = Path(path)
        self.dtype, self.device = dtype, _normalise_device(device)
        files, index_map = _checkpoint_files(self.path)
        # meta stand-ins: holding the real tensors here would keep replaced ones alive until the end
        self.expected = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
        self._stack = ExitStack()
        try:
            self._handles = {f: self._stack.enter_context(_open(f)) for f in files}
            self.plan = _plan_load(self.path, self.expected, self._handles, index_map, _block_from_config(self.path))
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles = {}

    def names(self, prefix: str | tuple[str, ...] | None = None) -> list[str]:
        """Model tensor names (state-dict order), those starting with `prefix` (a string or a tuple) if given."""
        return [n for n in self.plan if prefix is None or n.startswith(prefix)]

    def nbytes(self, names=None) -> int:
        """Bytes the tensors `names` (default all) take once loaded: floating ones in `dtype`."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                   for n, t in self.expected.items() if names is None or n in names)

    def read(self, name: str) -> torch.Tensor:
        """One model tensor, dequantised, as `dtype` (floating) on `device`."""
        want = self.expected[name]
        return _read(name, self.plan[name], self._handles, self.dtype if want.is_floating_point() else want.dtype,
                     self.device)

    def load_into(self, model: nn.Module, names=None, progress: bool = False, desc: str | None = None) -> None:
        """Read the tensors `names` (default all) and put them into `model` (see load_state_into)."""
        names = list(self.plan) if names is None else list(names)
        for name in tqdm(names, total=len(names), desc=desc or f"loading {self.path.name}", unit="tensor",
                         disable=not progress, leave=False if desc else True):
            _assign(model, name, self.read(name))

    def unload(self, model: nn.Module, names) -> None:
        """Replace the tensors `names` of `model` by meta stand-ins, freeing their memory (if nothing else holds
        them)."""
        for name in names:
            _assign(model, name, torch.empty_like(self.expected[name]))


def _normalise_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read: those the index names (each must exist), else every *.safetensors."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                n = sum(v == f for v in weight_map.values())
                first = next(k for k, v in weight_map.items() if v == f)
                raise CheckpointError(f"{index} maps {n} tensors (e.g. {first}) to file {f}, which does not exist "
                                      f"in {path}")
        return [path / f for f in files], weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files, None


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def _block_from_config(path: Path) -> tuple[int, int]:
    try:
        qc = json.loads((path / CONFIG_FILE).read_text()).get("quantization_config") or {}
        return tuple(qc.get("weight_block_size", (FP8_BLOCK, FP8_BLOCK)))
    except (OSError, json.JSONDecodeError, AttributeError):
        return FP8_BLOCK, FP8_BLOCK


def _canonical(raw: str) -> str:
    """Name variants found in the wild -> ours: a leading 'model.', 'weight_scale_inv' for 'scale'."""
    name = raw[len("model."):] if raw.startswith("model.") else raw
    if name.endswith(".weight_scale_inv"):
        name = name[: -len("weight_scale_inv")] + "scale"
    return name


def _plan_load(path: Path, expected: dict[str, torch.Tensor], handles: dict, index_map: dict | None,
               block: tuple[int, int]) -> dict[str, _Stored]:
    """Match checkpoint tensors to model tensors using headers only; raise on anything that does not fit."""
    found: dict[str, _Stored] = {}
    scales: dict[str, _Stored] = {}                          # keyed by the weight name they belong to
    unexpected: list[str] = []
    sources = (index_map.items() if index_map is not None
               else ((raw, f.name) for f, h in handles.items() for raw in h.keys()))
    for raw, fname in sources:
        file = path / fname
        try:
            sl = handles[file].get_slice(raw)
            entry = _Stored(raw, file, sl.get_dtype(), tuple(sl.get_shape()))
        except SafetensorError as e:
            where = f"{path / INDEX_FILE} lists it in {fname}" if index_map is not None else f"file {file}"
            raise CheckpointError(f"tensor {raw}: {where}, but it cannot be read there ({e})") from None
        name = _canonical(raw)
        if name in expected:
            table, key = found, name
        elif name.endswith(".scale") and name[: -len("scale")] + "weight" in expected:
            table, key = scales, name[: -len("scale")] + "weight"
        elif _SHARED_MTP_COPY.match(name):
            continue
        else:
            unexpected.append(f"{raw} (in {fname})")
            continue
        if key in table:
            raise CheckpointError(f"tensor {key} is stored twice: as {table[key].raw} in {table[key].file.name} "
                                  f"and as {raw} in {fname}")
        table[key] = entry

    missing = [n for n in expected if n not in found]
    unexpected += [f"{s.raw} (in {s.file.name})" for k, s in scales.items() if k not in found]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensors are missing from its safetensors files, e.g. "
                        f"{', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in it are not in the model, e.g. {', '.join(unexpected[:5])}")
    if problems:
        raise CheckpointError(f"checkpoint {path}: " + "; ".join(problems))
    for name, st in found.items():
        _classify(name, st, scales.get(name), expected[name], block)
    return {n: found[n] for n in expected}


def _classify(name: str, st: _Stored, scale: _Stored | None, want: torch.Tensor, block) -> None:
    """Set st.kind (plain / int / fp8 / fp4) and check dtype and logical shape against the model tensor."""
    where = f"tensor {st.raw} in file {st.file}"
    if scale is not None:
        st.scale_raw, st.scale_file, st.scale_dtype, st.scale_shape = scale.raw, scale.file, scale.dtype, scale.shape
        if scale.dtype not in _SCALE_DTYPES:
            raise CheckpointError(f"scale tensor {scale.raw} in file {scale.file}: dtype {scale.dtype} is not a "
                                  f"scale encoding (expected F8_E8M0 or F32)")
    shape = st.shape
    if not want.is_floating_point():
        if st.dtype not in _INTS or scale is not None:
            raise CheckpointError(f"{where}: dtype {st.dtype} cannot encode integer tensor {name} "
                                  f"({want.dtype})")
        st.kind = "int"
    elif st.dtype in _PLAIN_FLOAT:
        if scale is not None:
            raise CheckpointError(f"{where}: a {st.dtype} tensor comes with scale {scale.raw}; only FP8 / FP4 "
                                  f"weights have scales")
        st.kind = "plain"
    elif st.dtype == "F8_E4M3" or st.dtype in _PACKED_FP4:
        if scale is None:
            raise CheckpointError(f"{where}: stored as {st.dtype} but no scale tensor ({name[:-6]}scale or "
                                  f"{name[:-6]}weight_scale_inv) is in the checkpoint")
        if len(shape) != 2 or len(scale.shape) != 2:
            raise CheckpointError(f"{where}: quantised weights must be 2-D with 2-D scales, got {shape} and "
                                  f"{scale.shape}")
        if st.dtype == "F8_E4M3":
            st.kind, st.block = "fp8", fp8_scale_block(shape, scale.shape, block)
            if st.block is None:
                raise CheckpointError(f"{where}: scale {scale.raw} shape {scale.shape} does not fit the weight "
                                      f"shape {shape} with {block[0]}x{block[1]} blocks")
        else:
            st.kind = "fp4"
            if st.dtype != "F4":
                shape = (shape[0], shape[1] * 2)                 # two e2m1 values per byte
            if scale.shape != (shape[0], shape[1] // FP4_BLOCK) or shape[1] % FP4_BLOCK:
                raise CheckpointError(f"{where}: FP4 scale {scale.raw} has shape {scale.shape}, expected "
                                      f"{(shape[0], shape[1] // FP4_BLOCK)} for logical weight shape {shape}")
    else:
        raise CheckpointError(f"{where}: dtype {st.dtype} cannot encode floating tensor {name}")
    if shape != tuple(want.shape):
        raise CheckpointError(f"{where}: shape {shape} in the checkpoint, the model expects {tuple(want.shape)}")


def _get(handles: dict, file: Path, raw: str) -> torch.Tensor:
    try:
        return handles[file].get_tensor(raw)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"tensor {raw} in file {file}: cannot be read ({e})") from None


def _read(name: str, st: _Stored, handles: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = _get(handles, st.file, st.raw)
    if st.kind in ("plain", "int"):
        t = t.to(device=device, dtype=dtype)
        # safetensors may hand back memory at any byte offset; CPU GEMM kernels pick their code path (and
        # so their rounding) by alignment, so re-home such tensors for results identical to the saved model
        return t.clone() if t.data_ptr() % 64 else t
    s = _get(handles, st.scale_file, st.scale_raw).to(device)
    t = t.to(device)
    try:
        if st.kind == "fp8":
            return dequant_fp8_blocks(t, s, st.block, dtype)
        return dequant_fp4(t, s, FP4_BLOCK, dtype)
    except FormatError as e:
        raise CheckpointError(f"tensor {st.raw} in file {st.file}: {e}") from None


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put `t` in place of model tensor `name`: copy into a real tensor of the same kind, else replace the
    Parameter / buffer object (keeping requires_grad)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    is_param = leaf in mod._parameters
    old = mod._parameters[leaf] if is_param else mod._buffers[leaf]
    if not old.is_meta and old.dtype == t.dtype and old.device == t.device and old.shape == t.shape:
        with torch.no_grad():
            old.copy_(t)
    elif is_param:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[leaf] = t


__all__ = ["CheckpointError", "CheckpointReader", "load_state_into", "save_state", "CONFIG_FILE", "INDEX_FILE"]
