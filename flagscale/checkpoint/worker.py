"""What the conversion processes run (`python -m flagscale.checkpoint.worker import|export PLAN.json`),
started by flagscale.checkpoint.bridge with the plan it validated (under torchrun; a world of one alone).

import streams too: every rank of the TP x PP (x EP) layout builds its pipeline stage with megatron.core (the same
TransformerConfig and GPTModel as `flagscale train`) on the meta device, in the HF tensors' dtype, and the ranks
save one distributed checkpoint with megatron's torch_dist strategy through torch.distributed.checkpoint's writer
and a planner that makes each tensor when the writer asks for it: its rows are read from the safetensors files
straight into place (plain reads, not a memory map), written, and dropped. Memory: about the largest tensor.

export streams: one process plans the output files from the HF shapes, then writes them tensor by tensor. The
Megatron parameters an HF tensor needs are read from the checkpoint when it is first written, a layer at a time,
at TP=1 (a partial sharded state dict of a model built on the meta device: distributed checkpointing reads only
those chunks, whatever layout saved them), scattered into the HF tensors they make and dropped. Memory: about one
layer (or the embedding), not the model. A LoRA checkpoint streams too: a weight is read with its adapters and
merged, or the adapters alone become a PEFT folder (flagscale.checkpoint.lora).

Errors are reported as one `error:` line (the bridge passes it on) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from flagscale.checkpoint import hf, lora, mapping
from flagscale.errors import ConfigError, ConversionError, FlagScaleError, reported
from flagscale.settings import convert
from flagscale.train.settings import TrainSettings


def _settings(model: dict[str, Any], tp: int, pp: int, ep: int = 1) -> TrainSettings:
    system = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep}
    data = {"model": model, "system": system}
    return convert(TrainSettings, data, "model")


def start(tp: int, pp: int, ep: int = 1) -> None:
    """torch.distributed (gloo; torchrun's rendezvous, or a world of one) and megatron's parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # megatron's layers expect the RNG tracker to exist


def stop() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _model(t: TrainSettings, padded_vocab: int, **config: Any):
    """This rank's stage of the model, its weights left uninitialized (every one is then loaded)."""
    from flagscale.train import driver

    return driver.gpt_model(t, padded_vocab, driver.transformer_config(t, perform_initialization=False, **config))


def model_of(info: dict[str, Any], tp: int = 1, pp: int = 1, ep: int = 1):
    """This rank's stage of the model a checkpoint's model info describes (weights uninitialized)."""
    from flagscale.train import families

    fields = {k: v for k, v in info["architecture"].items() if k in families.ARCHITECTURE_FIELDS}
    model = _model(_settings({**fields, "vocab_size": info["vocab_size"]}, tp, pp, ep), info["padded_vocab_size"])
    if info.get("lora"):  # a LoRA run's checkpoint: its adapters too
        from flagscale.train.lora import apply

        apply(model, info["lora"])
    return model


@contextmanager
def _on_meta() -> Iterator[None]:
    """Build models on the meta device: shapes, names and sharded-state-dict keys without memory for weights.
    megatron.core all-reduces a tied embedding between the first and last pipeline stages as it builds them (so
    both copies start equal); with no data that step is skipped: every value is then filled from the HF files."""
    from unittest import mock

    import torch
    from megatron.core.models.common.language_module.language_module import LanguageModule

    with torch.device("meta"), mock.patch.object(LanguageModule, "_is_in_embd_group", lambda self: False):
        yield


def meta_model(info: dict[str, Any], tp: int = 1, pp: int = 1):
    """`model_of` on the meta device (`_on_meta`)."""
    with _on_meta():
        return model_of(info, tp, pp)


def weights(model) -> dict[str, Any]:
    """What a conversion moves: the parameters, and the routers' expert bias (a buffer the checkpoint keeps:
    DeepSeek-V3's e_score_correction_bias)."""
    named = dict(model.named_parameters())
    named.update({name: b for name, b in model.named_buffers() if name.endswith("router.expert_bias")})
    return named


def _check_maps(maps: list[mapping.TensorMap], params: dict[str, Any]) -> None:
    named = {m.megatron for m in maps}
    if named != set(params):
        raise ConversionError(
            f"the mapping and megatron.core's model disagree: parameters without a mapping "
            f"{sorted(set(params) - named)}, mappings without a parameter {sorted(named - set(params))}"
        )


class _Reader:
    """Slices of HF tensors from their safetensors shards (the header parsed once per file, checked by the bridge
    before), with plain reads: a memory map (safetensors' safe_open) would keep every page read resident in this
    process. Row ranges in the file's dtype go straight into their destination (`read_into`)."""

    def __init__(self, files: dict[str, str], stack: ExitStack) -> None:
        self.files, self.stack = files, stack
        self.fds: dict[str, int] = {}
        self.entries: dict[str, dict[str, tuple[str, list[int], int]]] = {}

    def _entry(self, path: str, name: str) -> tuple[str, list[int], int]:
        """dtype, shape and the file offset of tensor `name`'s data."""
        try:
            return self._header(path)[name]
        except (OSError, ValueError, KeyError) as exc:
            raise ConversionError(f"{path}: cannot read {name} ({_first_line(exc)})") from None

    def _header(self, path: str) -> dict[str, tuple[str, list[int], int]]:
        if path not in self.entries:
            self.fds[path] = fd = os.open(path, os.O_RDONLY)
            self.stack.callback(os.close, fd)
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, size, 8))
            header.pop("__metadata__", None)
            self.entries[path] = {
                k: (v["dtype"], v["shape"], 8 + size + v["data_offsets"][0]) for k, v in header.items()
            }
        return self.entries[path]

    def read_into(self, piece: mapping.Piece, dim: int, part) -> bool:
        """Read rows [start, stop) of the piece's tensor into `part`; False when that takes a conversion (another
        dtype, columns of a matrix): `read` does it then."""
        import torch

        assert piece.source is not None
        path = self.files[piece.source]
        try:
            kind, shape, begin = self._entry(path, piece.source)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(kind)
            if dtype != part.dtype or (dim != 0 and len(shape) > 1) or not part.is_contiguous():
                return False
            row = math.prod(shape[1:]) * part.element_size()
            if part.numel() * part.element_size() != piece.size * row:
                return False
            buffer = memoryview(part.view(torch.uint8).numpy()).cast("B")
            done, offset = 0, begin + piece.start * row
            while done < len(buffer):
                n = os.preadv(self.fds[path], [buffer[done:]], offset + done)
                if n <= 0:
                    raise ConversionError(f"{path}: cannot read {piece.source} (the file ends early)")
                done += n
            return True
        except (OSError, ValueError, KeyError) as exc:
            raise ConversionError(f"{path}: cannot read {piece.source} ({_first_line(exc)})") from None

    def read(self, piece: mapping.Piece, dim: int):
        """Rows [start, stop) of the piece's tensor in the file's dtype; for dim 1, those columns (the matrix is
        read whole, then sliced: a row-parallel weight at TP > 1)."""
        import torch

        assert piece.source is not None
        kind, shape, _ = self._entry(self.files[piece.source], piece.source)
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[kind]
        if dim == 0 or len(shape) == 1:
            rows = torch.empty((piece.size, *shape[1:]), dtype=dtype)
            self.read_into(piece, 0, rows)
            return rows
        whole = torch.empty(shape, dtype=dtype)
        self.read_into(mapping.Piece(piece.source, 0, shape[0]), 0, whole)
        return whole[:, piece.start : piece.stop]


# ------------------------------------------------------------------------------------------- import
class _Source:
    """This rank's parameters, made from the HF tensors only when the checkpoint writer asks for them: the model is
    built on the meta device, and a sharded tensor (a view of a parameter: a layer's weight, fc1's gate or up half)
    is filled from its own rows of the safetensors files when it is written, then dropped."""

    def __init__(self, params: dict[str, Any], pieces: dict[str, tuple[list[mapping.Piece], int]], reader) -> None:
        self.by_storage = {p.untyped_storage()._cdata: name for name, p in params.items()}
        self.params, self.pieces, self.reader = params, pieces, reader

    def tensor(self, view):
        """The real tensor for `view`, a meta tensor that views one of the parameters."""
        import torch

        name = self.by_storage.get(view.untyped_storage()._cdata)
        if name is None:
            raise ConversionError(f"internal: a sharded tensor of shape {list(view.shape)} views no parameter")
        param = self.params[name]
        pieces, dim = self.pieces[name]
        rows = _row_block(view, param)
        if rows == (0, param.shape[0]) or (rows is not None and dim == 0):  # the whole, or rows read alone
            r0, r1 = rows
            real = torch.empty((r1 - r0, *param.shape[1:]), dtype=param.dtype)
            _fill(real, pieces if r1 - r0 == param.shape[0] else mapping._cut(tuple(pieces), r0, r1), dim, self.reader)
            return real.view(view.shape)
        real = torch.empty(param.shape, dtype=param.dtype)
        _fill(real, pieces, dim, self.reader)
        return real.as_strided(view.shape, view.stride(), view.storage_offset()).clone()


def _row_block(view, param) -> tuple[int, int] | None:
    """The rows [r0, r1) of `param` that `view` is (a contiguous block, possibly with leading axes of size 1)."""
    row = math.prod(param.shape[1:])
    if not view.is_contiguous() or view.numel() % max(row, 1) or view.storage_offset() % max(row, 1):
        return None
    r0 = view.storage_offset() // max(row, 1)
    return r0, r0 + view.numel() // max(row, 1)


def _fill(target, pieces: list[mapping.Piece], dim: int, reader) -> None:
    """mapping.fill, reading each row range straight into its place when it can (no intermediate copy)."""
    offset = 0
    for piece in pieces:
        part = target.narrow(dim, offset, piece.size)
        if piece.source is None or not reader.read_into(piece, dim, part):
            mapping.fill(part, [piece], dim, reader.read)
        offset += piece.size
    if offset != target.shape[dim]:
        raise ValueError(f"the pieces cover {offset} of {target.shape[dim]} rows")


def _lazy_strategy(source: _Source):
    """megatron.core's torch_dist save strategy (the same files and metadata `flagscale train` writes and reads),
    with torch.distributed.checkpoint's writer, which asks for one tensor at a time, and a planner that makes
    each from the HF files when asked (megatron's own writer resolves every tensor before writing any)."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    class Planner(mcore_torch.MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            return source.tensor(data) if getattr(data, "is_meta", False) else data

    class Strategy(mcore_torch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            state, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, single_file_per_rank=True)
            planner = Planner(dedup_replicated_tensors=False, flatten_state_dict=False)
            try:
                dcp.save(mcore_torch.mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=planner)
            except dcp.api.CheckpointException as exc:  # every rank's failures: ours (a file we cannot read) first
                ours = [e for e, _ in exc.failures.values() if isinstance(e, FlagScaleError)]
                if ours:
                    raise ours[0] from None
                raise

    return Strategy("torch_dist", 1)


def run_import(plan: dict[str, Any]) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from flagscale.train import checkpoint

    tp, pp, ep, info = plan["tp"], plan["pp"], plan.get("ep", 1), plan["info"]
    start(tp, pp, ep)
    t = _settings(plan["model"], tp, pp, ep)
    # the checkpoint keeps the HF tensors' dtype (no fp32 upcast); training of any precision loads it
    with _on_meta():
        model = _model(t, info["padded_vocab_size"], params_dtype=_dtype(info))
    per_stage = t.model.num_layers // pp
    maps = mapping.model_maps(
        info["architecture"],
        info["vocab_size"],
        info["padded_vocab_size"],
        ps.get_pipeline_model_parallel_rank() * per_stage,
        per_stage,
        ps.is_pipeline_first_stage(),
        ps.is_pipeline_last_stage(),
        ps.get_expert_model_parallel_rank(),
        ep,
    )
    params = weights(model)
    _check_maps(maps, params)
    tp_rank = ps.get_tensor_model_parallel_rank()
    # experts are split over the expert-tensor-parallel group (megatron.core's default: the size of TP)
    etp_rank, etp = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    pieces = {}
    for tmap in maps:
        rank, size = (etp_rank, etp) if tmap.expert else (tp_rank, tp)
        pieces[tmap.megatron] = (tmap.shard(rank, size), tmap.dim)
    state = {
        "model": model.sharded_state_dict(),
        "iteration": 0,
        checkpoint.LAYOUT: checkpoint.parallel_layout(),
        checkpoint.MODEL_INFO: info,
    }
    with torch.no_grad(), ExitStack() as stack:
        reader = _Reader(plan["files"], stack)
        for name, value in params.items():  # made off the meta device (the routers' expert bias): filled now
            if not value.is_meta:
                _fill(value, *pieces[name], reader)
        strategy = _lazy_strategy(_Source(params, pieces, reader))
        checkpoint.save_state(plan["out"], 0, state, strategy)
    stop()


# ------------------------------------------------------------------------------------------- export
def _export_info(root: str) -> dict[str, Any]:
    from flagscale.train import checkpoint

    info = checkpoint.model_info(checkpoint.common_state(root))
    if info is None:
        raise ConfigError(
            f"{root}: the checkpoint records no model (saved before flagscale train recorded it): nothing to "
            "build a config.json from"
        )
    family = info["architecture"]["family"]
    if family not in hf.HF_NAMES:
        raise ConfigError(
            f"{root}: family {family} has no Hugging Face architecture; export writes {', '.join(hf.HF_NAMES)}"
        )
    return info


def _dtype(info: dict[str, Any]):
    """The HF checkpoint's dtype: the source's config.json, or the dtype its tensors had, else float32."""
    import torch

    source = info.get("hf") or {}
    config = source.get("config") or {}
    name = config.get("torch_dtype") or config.get("dtype") or source.get("dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _coverage(maps: list[mapping.TensorMap], shapes: dict[str, tuple[int, ...]]) -> dict[str, list[mapping.TensorMap]]:
    """For every HF tensor, the (TP=1) maps that write rows of it; a ConversionError when a tensor would be left
    incomplete."""
    writers: dict[str, list[mapping.TensorMap]] = {}
    covered: dict[str, int] = {}
    dims: dict[str, int] = {}
    for tmap in maps:
        for piece in tmap.shard(0, 1):
            if piece.source is not None:
                if tmap not in writers.setdefault(piece.source, []):
                    writers[piece.source].append(tmap)
                covered[piece.source] = covered.get(piece.source, 0) + piece.size
                dims[piece.source] = tmap.dim
    short = [name for name, shape in shapes.items() if covered.get(name) != shape[dims.get(name, 0)]]
    if short:
        raise ConversionError(f"the mapping leaves HF tensors incomplete: {short}")
    return writers


def hf_tensors(model, info: dict[str, Any]) -> dict[str, Any]:
    """The HF tensors of a whole (TP=1, PP=1) model held in memory, in the order transformers saves them (for a
    model already built and loaded; export itself streams, see `stream_export`)."""
    import torch

    arch, vocab, padded = info["architecture"], info["vocab_size"], info["padded_vocab_size"]
    shapes = mapping.hf_shapes(arch, vocab)
    dtype = _dtype(info)
    out = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    maps = mapping.model_maps(arch, vocab, padded, 0, arch["num_layers"], True, True)
    params = weights(model)
    _check_maps(maps, params)
    _coverage(maps, shapes)
    covered: dict[str, int] = {}
    with torch.no_grad():
        for tmap in maps:
            mapping.scatter(params[tmap.megatron], tmap.shard(0, 1), tmap.dim, out, covered)
    return out


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """The tensors of each output file, in order: a new file starts when the next tensor would take the current
    one above `max_shard_size` (as transformers' save_pretrained splits them)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [hf.SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(folder: Path, files: list[str], shards: list[list[str]], total: int) -> list[str]:
    """model.safetensors.index.json for more than one file; the files written, index included."""
    if len(files) == 1:
        return files
    weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / hf.INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*files, hf.INDEX]


def write_shards(tensors: dict[str, Any], folder: Path, max_shard_size: int) -> list[str]:
    """Tensors held in memory as model.safetensors, or model-0000i-of-0000n.safetensors + the index above the
    size (the same files `stream_export` writes)."""
    from safetensors.torch import save_file

    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards = plan_shards(sizes, max_shard_size)
    files = shard_names(len(shards))
    for file, names in zip(files, shards, strict=True):
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / file), metadata={"format": "pt"})
    return write_index(folder, files, shards, sum(sizes.values()))


class SafetensorsStream:
    """One safetensors file written tensor by tensor, byte for byte what `safetensors.torch.save_file(tensors,
    path, metadata={"format": "pt"})` writes for tensors of one dtype: the header (compact JSON, the metadata
    first, tensors by name, padded with spaces to 8 bytes), then the data in the same order. Only the tensor
    being written is in memory."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, itemsize: int) -> None:
        self.order = sorted(shapes)  # safetensors orders tensors by dtype, then name: one dtype here
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in self.order:
            nbytes = math.prod(shapes[name]) * itemsize
            header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        self.header, self.next = header, 0
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor) -> None:
        import torch

        expected = self.header[self.order[self.next]]
        if name != self.order[self.next] or list(tensor.shape) != expected["shape"]:
            raise ConversionError(f"internal: {name} {list(tensor.shape)} written out of order or shape")
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.next += 1

    def check(self) -> None:
        if self.next != len(self.order):
            raise ConversionError(f"internal: {self.file.name} got {self.next} of {len(self.order)} tensors")


def _group(name: str) -> str:
    """Parameters loaded together: a transformer layer's, or one parameter alone."""
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("decoder.layers.") else name


class _ParamLoader:
    """Megatron parameters of a checkpoint at TP=1, loaded a layer at a time through a partial sharded state
    dict (distributed checkpointing reads only those tensors' chunks, whatever layout saved them); each is
    handed out once and then dropped."""

    def __init__(self, root: str, model, dtype) -> None:
        from flagscale.train import checkpoint

        self.path = str(checkpoint.latest_dir(root))
        self.sharded = model.sharded_state_dict()  # on the meta device: keys, offsets and factories only
        self.shapes = {name: tuple(p.shape) for name, p in weights(model).items()}
        self.dtype = dtype
        self.loaded: dict[str, Any] = {}
        self.pending = set(self.shapes)
        self.groups: dict[str, list[str]] = {}
        for name in self.shapes:
            self.groups.setdefault(_group(name), []).append(name)

    def take(self, name: str):
        if name not in self.loaded:
            self._load([n for n in self.groups[_group(name)] if n in self.pending])
        self.pending.discard(name)
        return self.loaded.pop(name)

    def _load(self, names: list[str]) -> None:
        import dataclasses

        import torch
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        request = []
        for n in names:
            # loaded straight into the HF dtype (distributed checkpointing converts while it copies), in place:
            # the sharded tensors (a factory's too: fc1's gate and up halves) are views of this tensor
            self.loaded[n] = torch.empty(self.shapes[n], dtype=self.dtype)
            sharded = self.sharded[n]
            if isinstance(sharded, ShardedTensorFactory):
                built = nested_values(dataclasses.replace(sharded, data=self.loaded[n]).build())
            else:
                built = [dataclasses.replace(sharded, data=self.loaded[n], dtype=self.dtype)]
            request += [_own_chunk(t) for t in built if t is not None]
        dist_checkpointing.load(dict(enumerate(request)), self.path, validate_access_integrity=False)


def _own_chunk(sharded):
    """A layer's sharded tensor with its layer axis as a plain dimension of size 1. megatron.core saves a layer's
    tensor as one chunk of a stack of all layers; read alone in a world of one, its usual form would describe
    the other layers' chunks as this rank's too (torch's ShardedTensor places them on "another" rank)."""
    import dataclasses

    if not sharded.prepend_axis_num:
        return sharded
    data = sharded.data.view((1,) * sharded.prepend_axis_num + tuple(sharded.data.shape))
    return dataclasses.replace(sharded, data=data, local_shape=tuple(data.shape), prepend_axis_num=0)


def _view(value, pieces: list[mapping.Piece], dim: int, name: str, shape: tuple[int, ...]):
    """The HF tensor `name` as a view of Megatron tensor `value` when one piece along dim 0 is all of it (the
    embedding, norms, the output layer at TP=1): no copy. None otherwise."""
    offset = 0
    for piece in pieces:
        if piece.source == name and dim == 0 and piece.start == 0 and piece.size == shape[0]:
            return value.narrow(0, offset, piece.size)
        offset += piece.size
    return None


def stream_export(root: str, info: dict[str, Any], folder: Path, max_shard_size: int) -> list[str]:
    """Write the HF weights of a checkpoint file by file, tensor by tensor: the files are planned from the HF
    shapes, and the Megatron parameters a tensor needs are loaded (a layer at a time) when it is first written,
    scattered into the HF tensors they make and dropped. Memory: about a layer's parameters and HF tensors, or
    the embedding, whatever the model's size."""
    import torch

    arch, vocab, padded = info["architecture"], info["vocab_size"], info["padded_vocab_size"]
    shapes = mapping.hf_shapes(arch, vocab)
    dtype = _dtype(info)
    itemsize = torch.empty((), dtype=dtype).element_size()
    kind = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]  # safetensors' name
    maps = mapping.model_maps(arch, vocab, padded, 0, arch["num_layers"], True, True)
    model = meta_model(info)
    _check_maps(maps, lora.base_weights(weights(model)))
    writers = _coverage(maps, shapes)
    sizes = {name: math.prod(shape) * itemsize for name, shape in shapes.items()}
    shards = plan_shards(sizes, max_shard_size)
    files = shard_names(len(shards))
    params = lora.merging(_ParamLoader(root, model, dtype), info)  # a LoRA run's weights come merged
    ready: dict[str, Any] = {}  # HF tensors filled, not yet written
    for file, names in zip(files, shards, strict=True):
        stream = SafetensorsStream(folder / file, {n: shapes[n] for n in names}, kind, itemsize)
        try:
            for name in stream.order:
                for tmap in writers[name]:
                    if tmap.megatron in params.pending:
                        _scatter(params.take(tmap.megatron), tmap, shapes, dtype, ready)
                stream.write(name, ready.pop(name))
        finally:
            stream.file.close()
        stream.check()
    return write_index(folder, files, shards, sum(sizes.values()))


def _scatter(value, tmap: mapping.TensorMap, shapes: dict[str, tuple[int, ...]], dtype, ready: dict[str, Any]) -> None:
    """Write Megatron tensor `value` into the HF tensors it makes (made here when first written to)."""
    import torch

    pieces = tmap.shard(0, 1)
    for name in dict.fromkeys(p.source for p in pieces if p.source):
        if name not in ready:
            view = _view(value, pieces, tmap.dim, name, shapes[name]) if value.dtype == dtype else None
            ready[name] = view if view is not None else torch.empty(shapes[name], dtype=dtype)
            if view is not None:
                continue
        only = [p if p.source == name else mapping.Piece(None, 0, p.size) for p in pieces]  # the others: skipped
        mapping.scatter(value, only, tmap.dim, ready, {})


def _copy_tokenizer(info: dict[str, Any], folder: Path) -> tuple[list[str], str | None]:
    source = (info.get("hf") or {}).get("source")
    if not source or not Path(source).is_dir():
        return [], None
    copied = []
    for name in hf.TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, folder / name)
            copied.append(name)
    return copied, source if copied else None


def run_export(plan: dict[str, Any]) -> None:
    root, out = plan["checkpoint"], Path(plan["out"])
    start(1, 1)
    info = _export_info(root)
    arch = info["architecture"]
    if plan.get("lora") == "adapter":  # a LoRA run's adapters alone, as a PEFT folder
        adapter = lora.export_adapter(_ParamLoader(root, meta_model(info), _dtype(info)), info, out, root)
        Path(plan["result"]).write_text(json.dumps(adapter))
        stop()
        return
    files = stream_export(root, info, out, plan["max_shard_size"])
    (out / hf.CONFIG).write_text(json.dumps(hf.hf_config(info), indent=2, sort_keys=True) + "\n")
    copied, source = _copy_tokenizer(info, out)
    result = {"family": arch["family"], "files": [hf.CONFIG, *files, *copied], "tokenizer_from": source}
    Path(plan["result"]).write_text(json.dumps(result))
    stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("action", choices=["import", "export"])
    parser.add_argument("plan", type=Path)
    args = parser.parse_args(argv)
    plan = json.loads(args.plan.read_text())
    with reported(sys.stdout):
        try:
            (run_import if args.action == "import" else run_export)(plan)
        except (FlagScaleError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:  # unforeseen: the traceback for a bug report, and one line for the user
            traceback.print_exc()
            raise ConversionError(f"{args.action} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


if __name__ == "__main__":
    sys.exit(main())
