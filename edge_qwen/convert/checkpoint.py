"""Reading and validating Hugging Face Qwen checkpoint folders, tensor by tensor.

A checkpoint is config.json plus one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Safetensors headers are parsed here (not by the safetensors
package) so a missing or truncated shard is reported by name before any work starts, and
tensor data is read from memory maps in row chunks: converting never holds more than one
chunk of one tensor in memory, whatever the model size.

The tensor tables (Hugging Face name -> GGUF name and shape) live in `archs/`, one module per
architecture; this module checks a folder against its table and plans each GGUF tensor as the
pieces of checkpoint tensors it is streamed from.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype name -> (numpy dtype name used to read the raw bytes, bytes per value)
_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("uint16", 2)}
# Newer transformers save a VL model's parts under these prefixes; llama.cpp reads both spellings.
_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."), ("model.mtp.", "mtp."),
            # a headless model saved bare (Qwen3-Embedding): the published names without "model."
            ("embed_tokens.", "model.embed_tokens."), ("layers.", "model.layers."), ("norm.", "model.norm."))


def __getattr__(name: str) -> Any:
    # the Qwen2 table moved to archs/qwen2.py; old names still resolve
    if name == "SUPPORTED_ARCHITECTURES":
        from .archs import supported_architectures

        return supported_architectures()
    raise AttributeError(name)


@dataclass
class TensorRef:
    """Where one tensor's bytes live: file, absolute byte offset, dtype and shape."""

    name: str
    file: Path
    offset: int
    dtype: str  # safetensors name: F32, F16 or BF16
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _DTYPES[self.dtype][1] * _numel(self.shape)

    def chunks(self, max_bytes: int = 64 << 20, rows: tuple[int, int] | None = None,
               raw: bool = False) -> Iterator[Any]:
        """Yield float32 row blocks of the tensor (rows of the first axis), read via mmap.

        `rows` limits the blocks to rows [start, stop) (the elements of a 1-D tensor). Each
        block's memory map is dropped before the next one is made, so resident memory stays at
        one block however large the tensor is. bf16 is widened exactly to float32. `raw`: f32
        and f16 blocks are the memory map itself (read-only, no copy); the caller drops each
        block before taking the next.
        """
        import numpy as np

        np_dtype, size = _DTYPES[self.dtype]
        shape = self.shape if self.shape else (1,)
        one_d = len(shape) == 1
        row = 1 if one_d else _numel(shape[1:])
        begin, end = rows if rows is not None else (0, shape[0])
        step = max(1, max_bytes // max(row * 4, 1))
        for start in range(begin, end, step):
            n = min(step, end - start)
            try:
                mm = np.memmap(self.file, dtype=np_dtype, mode="r", offset=self.offset + start * row * size,
                               shape=(n * row,))
            except ValueError:  # numpy: "mmap length is greater than file size"
                raise CheckpointError(
                    f"{self.file} is shorter than its header says (tensor {self.name!r} runs past its end; the "
                    f"file was cut short or changed while being read); {fetch_again(self.file.parent)}") from None
            if self.dtype == "BF16":
                block = (mm.astype(np.uint32) << 16).view(np.float32)
            elif raw:
                block = mm.view(np.ndarray)  # the mapped pages, kept until the caller drops the block
            else:
                block = mm.astype(np.float32)
            del mm
            yield block if one_d else block.reshape((n,) + tuple(shape[1:]))

    def read(self) -> Any:
        """The whole tensor as float32 (for small tensors and tests)."""
        import numpy as np

        parts = list(self.chunks(max_bytes=1 << 40))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class Checkpoint:
    """A validated checkpoint folder: its config, architecture table and every tensor, in file order.

    `part` is "model" (the text model) or "mmproj" (the vision tower of a VL checkpoint).
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    arch: Any = None  # archs.Architecture
    part: str = "model"

    @property
    def tied(self) -> bool:
        from .archs import text_config

        return bool(text_config(self.config).get("tie_word_embeddings", False))

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors.values()), default=0)


@dataclass
class Piece:
    """Part of one checkpoint tensor: all of it, a row block ("rows:i/n") or an axis-2 slice ("t:i")."""

    ref: TensorRef
    take: str | None = None


@dataclass
class TensorSource:
    """One GGUF tensor as the checkpoint pieces it streams from, in order (experts: expert 0 first)."""

    name: str  # the Hugging Face name, for messages ("{0..7}" for stacked experts)
    gguf_name: str
    shape: tuple[int, ...]  # numpy order
    pieces: list[Piece]
    row: Any  # the archs.Row it comes from
    sizes: dict[str, int] = field(default_factory=dict)  # the config's sizes, for the row's transforms

    @property
    def file(self) -> Path:
        return self.pieces[0].ref.file

    def chunks(self, max_bytes: int = 64 << 20, raw: bool = False) -> Iterator[Any]:
        """float32 row blocks of the GGUF tensor, in the order its bytes are laid out (`raw`: see TensorRef.chunks)."""
        import numpy as np

        if self.row is not None and self.row.fn:
            # a transformed tensor (a hybrid model's head reorder, -exp(A_log), ...): read whole,
            # transformed as llama.cpp's converter does, then streamed in row blocks
            from .archs.transforms import apply

            data = apply(self.row.fn, self._read_pieces(), self.sizes)
            if tuple(data.shape) != tuple(self.shape):
                raise RuntimeError(f"internal error: {self.gguf_name} transformed to {data.shape}, planned {self.shape}")
            if data.ndim == 1:
                yield data
                return
            row = max(1, _numel(data.shape[1:]) * 4)
            step = max(1, max_bytes // row)
            for start in range(0, data.shape[0], step):
                yield data[start:start + step]
            return
        for piece in self.pieces:
            ref, take = piece.ref, piece.take
            if take is None:
                yield from ref.chunks(max_bytes, raw=raw)
            elif take.startswith("rows:"):
                i, n = (int(x) for x in take[5:].split("/"))
                per = ref.shape[0] // n
                yield from ref.chunks(max_bytes, rows=(i * per, (i + 1) * per), raw=raw)
            elif take.startswith("xT:"):  # each expert's column block, transposed (one expert at a time)
                i, n = (int(x) for x in take[3:].split("/"))
                width = ref.shape[2] // n
                for e in range(ref.shape[0]):
                    for block in ref.chunks(max_bytes, rows=(e, e + 1)):
                        yield np.ascontiguousarray(block[0][:, i * width:(i + 1) * width].T)
            elif take.startswith("pick:"):  # chosen rows, in the order given (a reranker's classifier)
                for i in (int(x) for x in take[5:].split(",")):
                    yield from ref.chunks(max_bytes, rows=(i, i + 1))
            elif take.startswith("mid:"):  # part i of n of axis 1, expert by expert (fused gate_up_proj)
                i, n = (int(x) for x in take[4:].split("/"))
                per = ref.shape[1] // n
                flat = TensorRef(ref.name, ref.file, ref.offset, ref.dtype, (ref.shape[0] * ref.shape[1],) + ref.shape[2:])
                for e in range(ref.shape[0]):
                    start = e * ref.shape[1] + i * per
                    for block in flat.chunks(max_bytes, rows=(start, start + per)):
                        yield block[None]
            else:  # "t:i": a patch convolution, small enough to read whole
                t = int(take[2:])
                yield np.ascontiguousarray(ref.read()[:, :, t])

    def _read_pieces(self) -> Any:
        import numpy as np

        parts = [p.ref.read() for p in self.pieces]
        return parts[0] if len(parts) == 1 else np.stack(parts)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def canonical_name(name: str) -> str:
    """A tensor name in the published layout (newer transformers nest the VL parts under model.)."""
    for old, new in _ALIASES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def expected_tensors(config: dict[str, Any], path: Path = Path("."), part: str = "model"
                     ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor name -> (GGUF tensor name, shape the checkpoint tensor must have).

    A Hugging Face tensor split into several GGUF tensors (a fused qkv) maps to the first.
    """
    from .archs import find_architecture

    from .archs import row_blocks

    arch = find_architecture(config, path, part)
    sizes = arch.sizes(config, path)
    kinds = arch.layer_kinds(config) if arch.layer_kinds is not None else None
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for row in arch.tensors:
        for b, gb in row_blocks(arch, row, sizes, kinds, config, path):
            xids = range(sizes["E"]) if "{xid}" in row.hf else [None]
            for x in xids:
                out.setdefault(row.hf.format(bid=b, xid=x), (row.gguf_name(gb), row.hf_shape(sizes)))
    return out


def tensor_plan(ckpt: Checkpoint) -> list[TensorSource]:
    """Every GGUF tensor to write, block by block, with the checkpoint pieces it is made of.

    `lm_head.weight` is planned whenever the checkpoint stores it, tied or not: llama.cpp's
    converter writes it too, and llama.cpp then uses it instead of the embedding.
    """
    from .archs import dims, row_blocks

    arch = ckpt.arch
    sizes = arch.sizes(ckpt.config, ckpt.path)
    kinds = arch.layer_kinds(ckpt.config) if arch.layer_kinds is not None else None
    plan: list[tuple[int, TensorSource]] = []
    for order, row in enumerate(arch.tensors):
        for b, gb in row_blocks(arch, row, sizes, kinds, ckpt.config, ckpt.path):
            name = row.hf.format(bid=b, xid="{xid}")
            if "{xid}" in row.hf:
                refs = [ckpt.tensors[name.format(xid=x)] for x in range(sizes["E"])]
                label = name.replace("{xid}", f"{{0..{sizes['E'] - 1}}}")
            else:
                if name not in ckpt.tensors:  # only lm_head of a tied checkpoint (checked in _validate)
                    continue
                refs, label = [ckpt.tensors[name]], name
            shape = dims(row.shape, sizes)
            src = TensorSource(label, row.gguf_name(gb), shape, [Piece(r, row.take) for r in refs], row, sizes)
            plan.append(((-1 if gb is None else gb), order, src))  # type: ignore[arg-type]
    plan.sort(key=lambda item: (item[0], item[1]))
    return [src for *_k, src in plan]


def hub_repo_of(folder: Path) -> str | None:
    """The repo id of a folder inside a Hugging Face cache snapshot (models--ORG--NAME/snapshots/C)."""
    parts = Path(folder).absolute().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1)
    return None


def fetch_again(folder: Path) -> str:
    """What to do about a damaged or missing file of checkpoint `folder`: the pull that replaces it.

    A pulled repo is named (a plain pull keeps the files it has; --force downloads them again).
    """
    repo = hub_repo_of(folder)
    if repo is not None:
        return f"download it again with `edge-qwen pull {repo} --force`"
    return "download it again (for a Hub repo: `edge-qwen pull ORG/NAME --force`)"


def _short(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= 120 else text[:117] + "..."


def read_json_file(file: Path) -> Any:
    """Parse a checkpoint's JSON file, or a CheckpointError naming it and saying to fetch it again."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        from ..files import describe_os_error

        raise CheckpointError(describe_os_error(e, "cannot read", file)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({_short(e)}); {fetch_again(file.parent)}") from None


def read_config(path: str | os.PathLike, part: str = "model") -> dict[str, Any]:
    """config.json of a checkpoint folder, refused unless it describes a supported architecture
    (for `part="mmproj"`: one whose vision tower edge-qwen converts)."""
    from .archs import find_architecture

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give a Hugging Face checkpoint folder "
                              "(with config.json and *.safetensors) or a repo id already pulled")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; it is not a Hugging Face checkpoint folder "
                              "(download the whole repository, e.g. with `edge-qwen pull`)")
    config = read_json_file(cfg_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    find_architecture(config, folder, part)
    return config


def read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header dict, data start offset) of a safetensors file, checking it is complete."""
    again = fetch_again(file.parent)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file} is truncated ({size} bytes); {again}")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or 8 + n > size:
                raise CheckpointError(f"{file} is truncated or not a safetensors file (header of {n} bytes, "
                                      f"file of {size}); {again}")
            raw = f.read(n)
    except OSError as e:  # a failing disk, a file that cannot be read: named, with what to do
        from ..files import describe_os_error

        raise CheckpointError(describe_os_error(e, "cannot read", file)) from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file} has a damaged header; {again}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a damaged header; {again}")
    start = 8 + n
    clean: dict[str, Any] = {}  # entries with their numbers as ints, checked
    for name, v in header.items():
        if name == "__metadata__":
            clean[name] = v
            continue
        try:
            begin, stop = (int(x) for x in v["data_offsets"])
            shape = [int(d) for d in v["shape"]]
            dtype = str(v["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file} has a damaged entry for tensor {name!r}; {again}") from None
        if begin < 0 or stop < begin or any(d < 0 for d in shape):
            raise CheckpointError(f"{file} has a damaged entry for tensor {name!r} (offsets {[begin, stop]}, "
                                  f"shape {shape}); {again}")
        if dtype in _DTYPES and stop - begin != _DTYPES[dtype][1] * _numel(shape):
            raise CheckpointError(f"{file}: tensor {name!r} has {stop - begin} bytes for shape {shape} {dtype}; "
                                  f"the file is damaged, {again}")
        clean[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, stop]}
    header = clean
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if start + end > size:
        raise CheckpointError(f"{file} is truncated: its tensors need {start + end} bytes but the file has "
                              f"{size}; {again}")
    return header, start


def open_checkpoint(path: str | os.PathLike, part: str = "model", mtp: bool = True) -> Checkpoint:
    """Validate a checkpoint folder and index its tensors (no tensor data is read).

    Checks: config.json and architecture; every shard present and complete; every tensor
    known to the architecture's table (or deliberately skipped, or of the other part of a VL
    checkpoint), of dtype F32/F16/BF16 and of the shape the config implies; no required
    tensor missing. `part="mmproj"` checks the vision tower instead of the text model.
    `mtp=False` leaves a hybrid model's MTP block (`mtp.*`) out, as llama.cpp's --no-mtp.
    Raises CheckpointError naming the file, tensor or key and what to do.
    """
    from .archs import find_architecture

    folder = Path(path)
    config = read_config(folder, part)
    arch = find_architecture(config, folder, part)
    if arch.check is not None:
        arch.check(config, folder)
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_bytes().decode("utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file} is damaged (not JSON with a weight_map of tensor names to shard "
                                  f"files); {fetch_again(folder)}")
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:  # shards lie beside the index, as Hugging Face saves them
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index_file} places tensors in {name!r}, which is not a file beside it; "
                                      f"the index is damaged, {fetch_again(folder)}")
    elif (folder / SINGLE_FILE).is_file():
        weight_map, names = None, [SINGLE_FILE]
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(found[:3])}: only safetensors weights are read)" if found else ""
        raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}; "
                              "download the safetensors weights of the checkpoint")
    ckpt = Checkpoint(path=folder, config=config, arch=arch, part=part)
    for name in names:
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"shard {file} listed in {INDEX_FILE} is missing; {fetch_again(folder)}")
        header, start = read_safetensors_header(file)
        ckpt.files.append(file)
        for tname, info in header.items():
            if tname == "__metadata__":
                continue
            if weight_map is not None and weight_map.get(tname) != name:
                raise CheckpointError(f"{file} holds tensor {tname!r} but {INDEX_FILE} places it in "
                                      f"{weight_map.get(tname)!r}; the index and shards do not match, {fetch_again(folder)}")
            ckpt.tensors[canonical_name(tname)] = TensorRef(tname, file, start + info["data_offsets"][0],
                                                            info["dtype"], tuple(info["shape"]))
    if weight_map is not None:
        for tname, shard in weight_map.items():
            if canonical_name(tname) not in ckpt.tensors:
                raise CheckpointError(f"tensor {tname!r} is listed in {INDEX_FILE} but missing from {shard}; "
                                      f"{fetch_again(folder)}")
    if arch.mtp and part == "model":  # how many MTP layers the GGUF gets (0: --no-mtp), for the sizes
        from .archs.hybrid import mtp_layers

        ckpt.config = {**config, "_mtp_layers": mtp_layers(config, list(ckpt.tensors), folder, mtp)}
    _validate(ckpt)
    return ckpt


def _is_skipped(name: str, skipped: dict[str, str]) -> bool:
    import re

    for pattern in skipped:
        if re.fullmatch(re.escape(pattern).replace(r"\{bid\}", r"\d+"), name):
            return True
    return False


def _validate(ckpt: Checkpoint) -> None:
    arch = ckpt.arch
    expected = expected_tensors(ckpt.config, ckpt.path, ckpt.part)
    if ckpt.part == "mmproj" and not any(name in expected for name in ckpt.tensors):
        raise CheckpointError(f"{ckpt.path} holds no vision tower weights (no {next(iter(expected)).split('.')[0]}.* "
                              f"tensors) although config.json describes one: it is a text-only copy of a {arch.name} "
                              "checkpoint; download the full repository for --mmproj, or convert without --mmproj")
    for name, ref in ckpt.tensors.items():
        if name.startswith(arch.other_part_prefixes):
            continue  # converted by the other part's table (the text model / the vision tower)
        if arch.mtp and name.startswith("mtp.") and not ckpt.config.get("_mtp_layers"):
            continue  # the MTP block, left out (--no-mtp)
        if ref.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {ref.name!r} in {ref.file.name} has dtype {ref.dtype}; edge-qwen reads "
                                  "F32, F16 and BF16 checkpoints only (dequantize GPTQ/AWQ checkpoints first)")
        if name not in expected:
            if _is_skipped(name, arch.skipped):
                continue
            raise CheckpointError(f"tensor {ref.name!r} in {ref.file.name} is not part of a {arch.name} model "
                                  "(no GGUF name for it); is this checkpoint another architecture or an adapter?")
        shape = expected[name][1]
        if tuple(ref.shape) != shape:
            raise CheckpointError(f"tensor {ref.name!r} in {ref.file.name} has shape {list(ref.shape)} but config.json "
                                  f"implies {list(shape)}; the weights do not match config.json")
    for name in expected:
        if name.startswith("mtp.") and name not in ckpt.tensors:
            raise CheckpointError(f"the MTP block of {ckpt.path} is incomplete: tensor {name!r} is missing; download "
                                  "the complete checkpoint, or convert with --no-mtp (mtp=False) to leave the MTP "
                                  "block out")
        if name not in ckpt.tensors and not (name == "lm_head.weight" and ckpt.tied):
            raise CheckpointError(f"tensor {name!r} is missing from {ckpt.path}; the checkpoint is incomplete "
                                  f"(download all shards) or is not a {arch.name} model")
