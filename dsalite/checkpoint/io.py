"""Checkpoint files: safetensors headers and reader, shards + index, config.json, and the one atomic-write helper.

This module knows files, not tensor names or models. Headers are parsed here rather than trusting `safetensors`, so
that a truncated download or a broken index is reported up front, naming the file, before any tensor is read.

Every writer in dsalite (HF export, convert, training checkpoints, LoRA adapters, GGUF) goes through `atomic_dir` or
`atomic_file`: the content is written under a temporary name beside the target (`<name>.tmp-<random>`), fsynced and
renamed into place; on any exception the temporary (and any parent folder made for it) is removed and the target is
as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TEMP_MARK = ".tmp-"  # `<target>.tmp-<random>`: a write in progress (or killed mid-way)
_MAX_HEADER = 100 * 2**20  # the safetensors format caps the JSON header at 100 MB

# safetensors dtype string -> (torch dtype, bits per header element). F4 headers count nibbles, torch counts pairs.
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 64), "F32": (torch.float32, 32), "F16": (torch.float16, 16), "BF16": (torch.bfloat16, 16),
    "I64": (torch.int64, 64), "I32": (torch.int32, 32), "I16": (torch.int16, 16), "I8": (torch.int8, 8),
    "U64": (torch.uint64, 64), "U32": (torch.uint32, 32), "U16": (torch.uint16, 16), "U8": (torch.uint8, 8),
    "BOOL": (torch.bool, 8), "C64": (torch.complex64, 64),
    "F8_E4M3": (torch.float8_e4m3fn, 8), "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E8M0": (torch.float8_e8m0fnu, 8), "F4": (torch.float4_e2m1fn_x2, 4),
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read, does not match the model, or could not be written; the message names the culprit."""


def progress(total: int, desc: str):
    """A tensor-count progress bar, silent when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False)  # None: off when not a TTY


# =========================================================================== small files


def read_config(path: str) -> dict:
    """The raw HF config dict of a checkpoint directory (or a config.json path); errors name the file."""
    p = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: config.json not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def read_chat_template(folder: str, tokenizer_config: dict) -> str | None:
    """A checkpoint's chat template: `chat_template` in tokenizer_config.json, else chat_template.jinja beside it."""
    template = tokenizer_config.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return template if isinstance(template, str) else None


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# =========================================================================== reading safetensors


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: torch.Size  # as torch will return it (F4: last dim halved)


def _read_header(file: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the number of data bytes after it; lengths checked first."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated: {size} bytes, too short for the 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise CheckpointError(
                    f"{file}: truncated or not a safetensors file: header length {n} exceeds the {size - 8} bytes left"
                )
            if n > _MAX_HEADER:
                raise CheckpointError(f"{file}: corrupt header: header length {n} exceeds the 100 MB limit")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt header: expected a JSON object, got {type(header).__name__}")
    return header, size - 8 - n


def _header_entry(file: str, name: str, e, data_len: int) -> _Entry | str:
    """One header entry checked against the file: the entry, or the problem with it."""
    try:
        dtype, bits = _ST_DTYPES[e["dtype"]]
        shape = [int(s) for s in e["shape"]]
        begin, end = (int(x) for x in e["data_offsets"])
        if any(s < 0 for s in shape) or not 0 <= begin <= end:
            raise ValueError
    except KeyError as k:
        return f"{file}: tensor {name!r}: corrupt header entry (missing or unknown {k})"
    except (TypeError, ValueError):
        return f"{file}: tensor {name!r}: corrupt header entry {e!r}"
    need = math.ceil(math.prod(shape) * bits / 8)
    if end - begin != need:
        return f"{file}: tensor {name!r}: data_offsets span {end - begin} bytes but {e['dtype']}{shape} needs {need}"
    if end > data_len:
        return f"{file}: truncated: tensor {name!r} ends at data byte {end} but the file holds only {data_len}"
    if bits == 4:
        if not shape or shape[-1] % 2:
            return f"{file}: tensor {name!r}: F4 shape {shape} has an odd last dimension"
        shape = shape[:-1] + [shape[-1] // 2]
    return _Entry(file, dtype, torch.Size(shape))


def _parse_header(file: str) -> dict[str, _Entry]:
    """Validate a safetensors file from its header alone: lengths, JSON, dtypes, offsets inside the file."""
    header, data_len = _read_header(file)
    out, problems = {}, []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        entry = _header_entry(file, name, e, data_len)
        if isinstance(entry, str):
            problems.append(entry)
        else:
            out[name] = entry
    if problems:
        raise CheckpointError("\n".join(problems))
    return out


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: cannot parse ({e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard files")
    return wm


def _tensor_files(path: str, problems: list[str]) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint path and its index's weight_map (None without an index)."""
    if os.path.isfile(path):
        return [path], None
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint path does not exist")
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        weight_map = _read_index(index)
        files = []
        for shard in sorted(set(weight_map.values())):
            f = os.path.join(path, shard)
            if os.path.isfile(f):
                files.append(f)
            else:
                problems.append(f"{f}: shard listed in {INDEX_NAME} is missing")
        return files, weight_map
    if os.path.isfile(os.path.join(path, SINGLE_NAME)):
        return [os.path.join(path, SINGLE_NAME)], None
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors files")
    return files, None


class CheckpointReader:
    """All tensors of a checkpoint directory by name, validated from the headers when opened; data read on demand.

    Layouts: `model.safetensors.index.json` (+ the shards its weight_map names), a single `model.safetensors`,
    or else every `*.safetensors` in the directory. A path to one `.safetensors` file also works.
    """

    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, object] = {}
        self._entries: dict[str, _Entry] = {}
        problems: list[str] = []
        files, weight_map = _tensor_files(path, problems)
        held: dict[str, set[str]] = {}  # shard file name -> tensor names
        for f in files:
            try:
                entries = _parse_header(f)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            held[os.path.basename(f)] = set(entries)
            for name, ent in entries.items():
                if name in self._entries:
                    problems.append(f"{name}: duplicate tensor, held by both {self._entries[name].file} and {f}")
                else:
                    self._entries[name] = ent
        for name, shard in (weight_map or {}).items():
            names = held.get(os.path.basename(shard))  # None: the shard is missing or broken, already reported
            if names is not None and name not in names:
                problems.append(f"{name}: {INDEX_NAME} maps it to {shard}, which does not hold it")
        if problems:
            raise CheckpointError("\n".join(problems))

    # ----- header queries (no data read) -----
    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{name}: no such tensor in {self.path}") from None

    def shape(self, name: str) -> torch.Size:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def file(self, name: str) -> str:
        return self._entry(name).file

    # ----- data -----
    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._entry(name).file
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(f, framework="pt", device="cpu")
        return h.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# =========================================================================== writing safetensors

# A tensor to write: (name on disk, producer called when its shard is written, size in bytes).
Item = tuple[str, Callable[[], torch.Tensor], int]


def plan_shards(items: list, size_of: Callable, max_shard_bytes: int) -> tuple[list[list], list[str]]:
    """Greedy split into shards of at most max_shard_bytes (a lone larger tensor gets its own) and their file names."""
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + size_of(item) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += size_of(item)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return shards, names


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone views and tensors sharing storage (tied weights): safetensors refuses shared or partial storage."""
    out, seen = {}, set()
    for k, t in tensors.items():
        st = t.untyped_storage()
        whole = t.is_contiguous() and t.data_ptr() == st.data_ptr() and st.nbytes() == t.numel() * t.element_size()
        if not whole or (st.data_ptr() and st.data_ptr() in seen):
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def write_shards(folder: str, shards: list[list[Item]], names: list[str], desc: str) -> None:
    """Write planned shards into `folder`, one shard of tensors in memory at a time, plus the index when sharded."""
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    bar = progress(sum(map(len, shards)), desc)
    try:
        for fname, shard in zip(names, shards):
            tensors = _own_storage({name: produce() for name, produce, _ in shard})
            save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
            for name, t in tensors.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            del tensors
            bar.update(len(shard))
    finally:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(folder, INDEX_NAME), index)


# =========================================================================== atomic writes


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prepare(path: str) -> tuple[str, list[str]]:
    """`path` made absolute, and the parent folders created for it (innermost first, removed again on failure)."""
    path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    made, d = [], os.path.dirname(path)
    while not os.path.isdir(d):
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path, made


def _temp_name(path: str) -> str:
    return f"{path}{TEMP_MARK}{secrets.token_hex(4)}"


def _abandon(tmp: str, made: list[str]) -> None:
    """Remove a failed write's temporary and the (empty) parent folders made for it, innermost first."""
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    for d in made:
        try:
            os.rmdir(d)
        except OSError:
            break


def _swap_dir(tmp: str, path: str) -> None:
    """Rename the finished folder to `path`; an existing `path` is moved aside first and deleted only afterwards."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = f"{path}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield an empty temporary folder beside `path`; when the block ends cleanly, fsync every file in it and rename
    it to `path` (an existing folder there is replaced whole). On any exception nothing of the write is left and
    `path` is as it was."""
    path, made = _prepare(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path}: exists and is not a directory; refusing to replace it")
    tmp = _temp_name(path)
    os.mkdir(tmp)  # not mkdtemp: the folder keeps the umask's permissions, not 0700
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for f in files:
                _fsync(os.path.join(root, f))
        _swap_dir(tmp, path)
    except BaseException:
        _abandon(tmp, made)
        raise


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield the name of an empty temporary file beside `path`; when the block ends cleanly, fsync it and rename it
    over `path`. On any exception the temporary is removed and `path` is as it was."""
    path, made = _prepare(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory; give the path of the file to write")
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode after the umask, as open() would
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        _abandon(tmp, made)
        raise
