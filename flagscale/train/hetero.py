"""Heterogeneous training: one job over meshes with different parallel layouts (`train.system.hetero`).

A *mesh* is a group of ranks of one device type with its own tensor-parallel (TP), data-parallel (DP) and
pipeline (PP) sizes and micro-batch size. The meshes are ordered: their pipeline stages, one after another, form
the job's pipeline, `layer_split` gives every stage its transformer layers, and global ranks are numbered mesh by
mesh (within a mesh as megatron numbers them: TP fastest, then DP, then PP).

What crosses a stage border is the activation of one *pipeline micro-batch*: `dp x micro_batch_size` samples,
the same count on every mesh. DP rank d of a stage holds samples [d x mbs, (d + 1) x mbs) of it, so a border
between layouts is a re-slicing along the batch dimension (forward: activations; backward: their gradients,
scaled by DP_sender / DP_receiver so that every mesh's DP averaging yields the gradient of the same global
mean loss). Gradient norms are summed over all meshes (one DP replica of each). Meshes whose layouts are all
the same use megatron's own groups and point-to-point path.

Nothing heavy is imported at module level: settings, validation and the dry run use this without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from flagscale.errors import ConfigError
from flagscale.settings import setting


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _positive_items(value: tuple[int, ...]) -> tuple[int, ...]:
    if not value or min(value) < 1:
        raise ValueError("every stage needs at least one layer")
    return value


def _meshes(value: tuple) -> tuple:
    if not value:
        raise ValueError("list at least one mesh")
    return value


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class MeshSettings:
    """One mesh of `train.system.hetero.meshes`."""

    # the hostfile's `type=` of this mesh's nodes (and the key of experiment.device_type_envs); None: any node
    device_type: str | None = None
    # its device manifest (hardware/<device>); None: experiment.runner.device
    device: str | None = None
    tensor_model_parallel_size: int = setting(1, check=_positive)
    data_parallel_size: int = setting(1, check=_positive)
    pipeline_model_parallel_size: int = setting(1, check=_positive)
    micro_batch_size: int | None = setting(None, check=_positive)  # None: train.model.micro_batch_size


@dataclass(frozen=True)
class HeteroSettings:
    """`train.system.hetero`: the meshes in pipeline order, the layers of every stage, the cross-mesh path."""

    meshes: tuple[MeshSettings, ...] = setting(check=_meshes)
    layer_split: tuple[int, ...] | None = setting(None, check=_positive_items)  # None: even over all stages
    cross_mesh: Literal["gloo"] = "gloo"  # activations cross mesh borders through the CPU


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Mesh:
    index: int
    device_type: str | None
    device: str | None
    tp: int
    dp: int
    pp: int
    mbs: int
    first_rank: int
    first_stage: int

    @property
    def size(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.size)

    @property
    def name(self) -> str:
        return f"mesh {self.index}" + (f" ({self.device_type})" if self.device_type else "")

    def rank(self, stage: int, dp_rank: int, tp_rank: int) -> int:
        """The global rank at (stage, DP rank, TP rank); megatron's order: TP fastest, then DP, then PP."""
        return self.first_rank + (stage - self.first_stage) * self.tp * self.dp + dp_rank * self.tp + tp_rank

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(stage, DP rank, TP rank) of a global rank of this mesh."""
        local = rank - self.first_rank
        return self.first_stage + local // (self.tp * self.dp), (local // self.tp) % self.dp, local % self.tp


@dataclass(frozen=True)
class Layout:
    meshes: tuple[Mesh, ...]
    split: tuple[int, ...]  # layers per stage

    @property
    def world_size(self) -> int:
        return sum(m.size for m in self.meshes)

    @property
    def stages(self) -> int:
        return len(self.split)

    @property
    def samples_per_microbatch(self) -> int:
        return self.meshes[0].dp * self.meshes[0].mbs

    @property
    def uniform(self) -> bool:
        """Every mesh has the same TP, DP, micro-batch and device manifest: megatron's own groups and p2p fit (meshes
        of different devices keep the gloo borders, whatever their layouts)."""
        first = self.meshes[0]
        return all((m.tp, m.dp, m.mbs, m.device) == (first.tp, first.dp, first.mbs, first.device) for m in self.meshes)

    def mesh_of_rank(self, rank: int) -> Mesh:
        return next(m for m in self.meshes if rank in m.ranks)

    def mesh_of_stage(self, stage: int) -> Mesh:
        return next(m for m in self.meshes if m.first_stage <= stage < m.first_stage + m.pp)

    def first_layer(self, stage: int) -> int:
        return sum(self.split[:stage])

    def megatron_layout(self) -> list[list[str]]:
        """megatron.core's pipeline_model_parallel_layout: embedding on the first stage, loss on the last."""
        rows = [["decoder"] * n for n in self.split]
        rows[0].insert(0, "embedding")
        rows[-1].append("loss")
        return rows


def layout(hetero: HeteroSettings, num_layers: int, micro_batch_size: int) -> Layout:
    """The meshes with their ranks and stages (no checks: see `check`)."""
    meshes, rank, stage = [], 0, 0
    for i, s in enumerate(hetero.meshes):
        mesh = Mesh(
            i,
            s.device_type,
            s.device,
            s.tensor_model_parallel_size,
            s.data_parallel_size,
            s.pipeline_model_parallel_size,
            s.micro_batch_size or micro_batch_size,
            rank,
            stage,
        )
        meshes.append(mesh)
        rank, stage = rank + mesh.size, stage + mesh.pp
    split = hetero.layer_split
    if split is None:
        split = (num_layers // stage,) * stage if num_layers % stage == 0 else ()
    return Layout(tuple(meshes), tuple(split))


def train_layout(t) -> Layout:
    """The layout of a TrainSettings with `system.hetero` set."""
    return layout(t.system.hetero, t.model.num_layers, t.model.micro_batch_size)


def padding_tp(t) -> int:
    """The TP the vocabulary is padded for: every mesh's embedding and output layer split it evenly and all hold
    the same padded rows (the padded logits take part in the softmax, so the size is part of the math)."""
    if t.system.hetero is None:
        return t.system.tensor_model_parallel_size
    return math.lcm(*(m.tensor_model_parallel_size for m in t.system.hetero.meshes))


# ------------------------------------------------------------------------------------------- validation
def check(t, world_size: int, where: str = "train") -> None:
    """Every rule of a hetero job that the settings alone decide; one line naming the mesh and the rule."""
    m, h = t.model, t.system.hetero
    key = f"{where}.system.hetero"
    _check_unsupported(t, where)
    lay = layout(h, m.num_layers, m.micro_batch_size)
    if lay.world_size != world_size:
        sizes = " + ".join(f"{x.tp}x{x.dp}x{x.pp}" for x in lay.meshes)
        raise ConfigError(
            f"{key}.meshes: the meshes hold {sizes} = {lay.world_size} ranks (TP x DP x PP each) but the job has "
            f"{world_size} (nnodes x nproc_per_node)"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"{where}.model.hidden_size={m.hidden_size} is not a multiple of "
            f"num_attention_heads={m.num_attention_heads} (or set kv_channels, the head dim)"
        )
    if m.num_attention_heads % groups:
        raise ConfigError(
            f"{where}.model.num_attention_heads={m.num_attention_heads} is not a multiple of num_query_groups={groups}"
        )
    per_micro = lay.samples_per_microbatch
    for mesh in lay.meshes:
        _check_mesh(t, mesh, per_micro, mesh_key(mesh, where))
    _check_split(h, lay, m.num_layers, key)
    if m.share_embeddings_and_output_weights and lay.stages > 1:
        first, last = lay.meshes[0], lay.meshes[-1]
        if (first.tp, first.dp) != (last.tp, last.dp):
            raise ConfigError(
                f"{key}.meshes: tied embeddings (model.share_embeddings_and_output_weights) need the first and last "
                f"mesh to split them alike: {first.name} has TP={first.tp} DP={first.dp}, {last.name} TP={last.tp} "
                f"DP={last.dp} (make them equal or untie the embeddings)"
            )
    if (m.max_position_embeddings or m.seq_length) < m.seq_length:
        raise ConfigError(
            f"{where}.model.max_position_embeddings={m.max_position_embeddings} is below seq_length={m.seq_length}"
        )


def _check_mesh(t, mesh: Mesh, per_micro: int, key: str) -> None:
    m = t.model
    groups = m.num_query_groups or m.num_attention_heads
    rules = (
        (m.num_attention_heads % mesh.tp, f"num_attention_heads={m.num_attention_heads}", ""),
        (groups % mesh.tp, f"num_query_groups={groups}", ": every TP rank needs whole key/value heads"),
    )
    for broken, what, why in rules:
        if broken:
            raise ConfigError(f"{key}: model.{what} is not a multiple of its tensor_model_parallel_size={mesh.tp}{why}")
    if mesh.dp * mesh.mbs != per_micro:
        raise ConfigError(
            f"{key}: data_parallel_size x micro_batch_size = {mesh.dp} x {mesh.mbs} = "
            f"{mesh.dp * mesh.mbs}, but mesh 0 takes {per_micro} samples per pipeline micro-batch; every mesh must "
            "take the same (set micro_batch_size per mesh)"
        )
    if m.global_batch_size % per_micro:
        raise ConfigError(
            f"{key}: model.global_batch_size={m.global_batch_size} is not a multiple of "
            f"data_parallel_size x micro_batch_size = {per_micro}"
        )


def mesh_key(mesh: Mesh, where: str = "train") -> str:
    """How errors name a mesh: its key, and its device type when it has one."""
    return f"{where}.system.hetero.meshes[{mesh.index}]" + (f" (type {mesh.device_type})" if mesh.device_type else "")


def _check_split(h: HeteroSettings, lay: Layout, num_layers: int, key: str) -> None:
    stages = sum(mesh.pp for mesh in lay.meshes)
    if h.layer_split is None:
        if num_layers % stages:
            raise ConfigError(
                f"{key}.layer_split: model.num_layers={num_layers} does not split evenly over the {stages} pipeline "
                "stages of the meshes; give the layers of every stage (e.g. [1, 3])"
            )
        return
    if len(h.layer_split) != stages:
        raise ConfigError(
            f"{key}.layer_split={list(h.layer_split)}: {len(h.layer_split)} stage(s), but the meshes have {stages} "
            "(the sum of their pipeline_model_parallel_size)"
        )
    if sum(h.layer_split) != num_layers:
        raise ConfigError(
            f"{key}.layer_split={list(h.layer_split)} sums to {sum(h.layer_split)}, not model.num_layers={num_layers}"
        )


def _check_unsupported(t, where: str) -> None:
    """What the hetero path does not run (yet): refused, with what to do instead."""
    s, m = t.system, t.model
    key = f"{where}.system"
    fixed = (
        ("tensor_model_parallel_size", s.tensor_model_parallel_size),
        ("pipeline_model_parallel_size", s.pipeline_model_parallel_size),
        ("expert_model_parallel_size", s.expert_model_parallel_size),
        ("context_parallel_size", s.context_parallel_size),
    )
    for name, value in fixed:
        if value != 1:
            raise ConfigError(f"{key}.{name}={value}: with system.hetero the meshes set the layout; leave it at 1")
    refused = (
        (s.virtual_pipeline_model_parallel_size not in (None, 1), "virtual_pipeline_model_parallel_size", "null"),
        (bool(s.sequence_parallel), "sequence_parallel", "false or null"),
        (s.use_distributed_optimizer, "use_distributed_optimizer", "false"),
        (s.precision == "fp16", "precision=fp16", "fp32 or bf16"),
        (s.recompute_granularity == "full", "recompute_granularity=full", "selective or null"),
        (bool(s.checkpoint.hf_model), "checkpoint.hf_model", "a checkpoint made by flagscale checkpoint import"),
    )
    for broken, what, instead in refused:
        if broken:
            raise ConfigError(
                f"{key}.{what}: not supported with system.hetero yet (docs/hetero.md, limits); use {instead}"
            )
    if m.moe is not None or m.lora is not None:
        raise ConfigError(
            f"{where}.model.{'moe' if m.moe is not None else 'lora'}: not supported with system.hetero yet "
            "(docs/hetero.md, limits)"
        )


def check_nodes(t, nodes: list, nproc_per_node: int, hostfile: str | None, rdzv_backend: str = "static") -> None:
    """The hostfile's `type=` against the meshes: every mesh with a device_type covers whole nodes of that type,
    listed in mesh order (torchrun numbers ranks node by node, in hostfile order with the static rendezvous)."""
    lay = train_layout(t)
    if not any(mesh.device_type for mesh in lay.meshes):
        return
    if hostfile is None:
        raise ConfigError(
            "train.system.hetero.meshes: device_type names hostfile types, and this job has none (local or Slurm): "
            "set experiment.runner.hostfile with launcher ssh, or leave device_type unset"
        )
    if len(nodes) > 1 and rdzv_backend != "static":
        raise ConfigError(
            f"experiment.runner.rdzv_backend={rdzv_backend}: meshes of device types need node ranks in hostfile "
            "order, which only the static rendezvous gives (c10d ranks nodes as they join); set it to static"
        )
    for mesh in lay.meshes:
        first_node, offset = divmod(mesh.first_rank, nproc_per_node)
        count, rest = divmod(mesh.size, nproc_per_node)
        where = mesh_key(mesh)
        if offset or rest:
            raise ConfigError(
                f"{where}: its {mesh.size} ranks from rank {mesh.first_rank} do not fill whole nodes of "
                f"nproc_per_node={nproc_per_node}"
            )
        if mesh.device_type is None:
            continue
        wrong = [n for n in nodes[first_node : first_node + count] if n.type != mesh.device_type]
        if wrong or first_node + count > len(nodes):
            found = wrong[0].host + f" (type={wrong[0].type})" if wrong else "too few nodes"
            raise ConfigError(
                f"{where}: needs {count} node(s) of type={mesh.device_type} at hostfile positions "
                f"{first_node + 1}..{first_node + count} ({hostfile} lists the meshes' nodes in mesh order), "
                f"found {found}"
            )


def mesh_of_node(t, node_rank: int, nproc_per_node: int) -> Mesh:
    return train_layout(t).mesh_of_rank(node_rank * nproc_per_node)


def dryrun_lines(t) -> list[str]:
    """action=dryrun: every mesh, its ranks, layout, stages and layers."""
    lay = train_layout(t)
    lines = [
        f"hetero: {len(lay.meshes)} mesh(es), {lay.stages} pipeline stage(s), {lay.samples_per_microbatch} sample(s) "
        f"per pipeline micro-batch, cross-mesh path {t.system.hetero.cross_mesh}"
        + (" (all meshes alike: megatron's own groups and p2p)" if lay.uniform else "")
    ]
    for mesh in lay.meshes:
        stages = range(mesh.first_stage, mesh.first_stage + mesh.pp)
        layers = ", ".join(
            f"stage {s}: layers {lay.first_layer(s)}..{lay.first_layer(s) + lay.split[s] - 1}" for s in stages
        )
        lines.append(
            f"  {mesh.name}: ranks {mesh.ranks.start}..{mesh.ranks.stop - 1}, TP={mesh.tp} DP={mesh.dp} "
            f"PP={mesh.pp}, micro-batch {mesh.mbs}, device {mesh.device or 'the job device'}; {layers}"
        )
    return lines


def parameter_lines(t, vocab_size: int | None) -> list[str]:
    """action=dryrun: the parameters per rank of every stage, as its mesh splits them (flagscale.train.shapes'
    counts, the vocabulary padded for every mesh's TP)."""
    from flagscale.train.shapes import _norm, layer_parameters
    from flagscale.train.tokenizer import padded_vocab_size

    if vocab_size is None:
        return ["parameters per rank: set train.model.vocab_size to count them (the hf tokenizer loads on the nodes)"]
    m, lay = t.model, train_layout(t)
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, padding_tp(t))
    positions = (m.max_position_embeddings or m.seq_length) * m.hidden_size
    lines = [f"parameters per rank ({m.family}, vocabulary {vocab_size} padded to {padded}; DP ranks hold copies):"]
    for stage, layers in enumerate(lay.split):
        tp = lay.mesh_of_stage(stage).tp
        rows = padded // tp * m.hidden_size
        embedding = rows + (positions if m.position_embedding_type == "learned_absolute" else 0) if stage == 0 else 0
        head = 0
        if stage == lay.stages - 1:
            head = _norm(m, m.hidden_size) + (0 if m.share_embeddings_and_output_weights and stage == 0 else rows)
        per_layer = layer_parameters(m, tp)
        total = embedding + layers * per_layer + head
        lines.append(
            f"  stage {stage}: {total:,} on each of its {tp} TP rank(s) = embedding {embedding:,} + {layers} layer(s)"
            f" x {per_layer:,} + final norm and output layer {head:,}"
        )
    return lines


# -------------------------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Runtime:
    """This rank's place in the layout, once the process groups exist."""

    layout: Layout
    rank: int
    mesh: Mesh
    stage: int
    dp_rank: int
    tp_rank: int
    border_group: Any = None  # the world over gloo: what crosses stage borders (cross_mesh gloo)

    @property
    def micro_batch_size(self) -> int:
        return self.mesh.mbs

    def config_overrides(self) -> dict:
        return dict(
            tensor_model_parallel_size=self.mesh.tp,
            pipeline_model_parallel_size=self.layout.stages,
            pipeline_model_parallel_layout=self.layout.megatron_layout() if self.layout.stages > 1 else None,
            sequence_parallel=False,
        )

    def describe(self) -> str:
        return ", ".join(f"mesh {m.index} TP={m.tp} DP={m.dp} PP={m.pp}" for m in self.layout.meshes)


def initialize(t, rank: int) -> Runtime:
    """Megatron's process groups for the layout (call on every rank, after init_process_group)."""
    from megatron.core import parallel_state

    lay = train_layout(t)
    mesh = lay.mesh_of_rank(rank)
    stage, dp_rank, tp_rank = mesh.coordinates(rank)
    runtime = Runtime(lay, rank, mesh, stage, dp_rank, tp_rank)
    if lay.uniform:  # megatron numbers ranks as the meshes do: its own groups and p2p fit
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=mesh.tp, pipeline_model_parallel_size=lay.stages
        )
        return runtime
    if not hasattr(parallel_state, "initialize_hetero_model_parallel"):
        raise ConfigError(
            "train.system.hetero: this megatron-core has no heterogeneous process groups (FlagScale's megatron patch "
            "0011-hetero-process-groups): install the backend from this checkout (flagscale install --backend megatron)"
        )
    import torch.distributed as dist

    place = parallel_state.initialize_hetero_model_parallel([(m.tp, m.dp, m.pp) for m in lay.meshes])
    assert (place["stage"], place["dp_rank"], place["tp_rank"]) == (stage, dp_rank, tp_rank), place
    border = dist.new_group(list(range(lay.world_size)), backend="gloo")  # every rank, once, in the same order
    runtime = replace(runtime, border_group=border)
    global _ACTIVE
    _ACTIVE = runtime
    return runtime


_ACTIVE: Runtime | None = None  # the process's layout when its meshes differ (megatron's groups are set for it)


def active() -> Runtime | None:
    """This process's hetero layout when its meshes differ, else None (homogeneous, or meshes all alike)."""
    return _ACTIVE


def adjust_optimizer(optimizer, rt: Runtime) -> None:
    """Grad norms (and so clipping) over all meshes: the statistics group is the world, and only DP rank 0 of a
    mesh counts its gradients (the DP replicas hold the same ones after the DP reduction)."""
    if rt.layout.uniform:
        return
    import torch.distributed as dist

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.grad_stats_parallel_group = dist.group.WORLD
        if rt.dp_rank:
            opt.get_main_grads_for_grad_norm = list


def schedule_arguments(rt: Runtime, config) -> dict:
    """The p2p communicator and process groups megatron's 1F1B schedule takes for this layout (none: its own)."""
    if rt.layout.uniform:
        return {}
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    groups = ProcessGroupCollection()
    groups.tp = ps.get_tensor_model_parallel_group()
    groups.cp = ps.get_context_parallel_group()
    groups.pp = ps.get_pipeline_model_parallel_group()
    groups.embd = ps.get_embedding_group(check_initialized=False)
    groups.pos_embd = None
    groups.dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    from megatron.core import device_utils

    communicator = Communicator(rt, config, groups.pp, device_utils.current_device())
    return {"p2p_communicator": communicator, "pg_collection": groups}


class Communicator:
    """megatron's P2PCommunicator interface between stages of any layouts, over gloo.

    A border re-slices the pipeline micro-batch along the batch dimension ([seq, batch, hidden]): TP rank 0 of
    every sender DP rank sends each receiver (all TP ranks of the next stage) the samples they share; gradients go
    back the same way, from TP rank 0 of the later stage to every rank of the earlier one, where they are scaled by
    DP_earlier / DP_later (the later mesh's DP averaging is not the earlier one's)."""

    virtual_pipeline_model_parallel_size = None

    def __init__(self, rt: Runtime, config, pp_group=None, device=None) -> None:
        self.rt, self.config = rt, config
        self.pp_group = pp_group  # megatron's HeteroPipelineGroup: rank() is the stage, size() the stages
        self.dtype, self.device = config.pipeline_dtype, device
        self.seconds, self.exchanges = 0.0, 0  # time spent at the borders (the driver logs it at the end)

    # ---- the slices: [(peer rank, first sample, past the last sample) relative to this rank's own samples]
    def _pieces(self, mine: Mesh, my_stage: int, other: Mesh, other_stage: int, sending: bool):
        """Who this rank exchanges with across the border to `other_stage`: (peer, lo, hi) in this rank's samples.
        Only TP rank 0 sends; every TP rank receives."""
        rt = self.rt
        lo, hi = rt.dp_rank * mine.mbs, (rt.dp_rank + 1) * mine.mbs
        pieces = []
        for d in range(other.dp):
            a, b = max(lo, d * other.mbs), min(hi, (d + 1) * other.mbs)
            if a >= b:
                continue
            if sending:
                if rt.tp_rank == 0:
                    pieces += [(other.rank(other_stage, d, t), a - lo, b - lo) for t in range(other.tp)]
            else:
                pieces.append((other.rank(other_stage, d, 0), a - lo, b - lo))
        return pieces

    def _neighbour(self, step: int) -> tuple[Mesh, int]:
        stage = self.rt.stage + step
        return self.rt.layout.mesh_of_stage(stage), stage

    def _ops(self, send: tuple | None, recv: tuple | None):
        """Post the sends and receives of one step; returns the received tensor (or None) once all completed.
        send: (tensor, step); recv: (shape, step, scale)."""
        import time

        import torch
        import torch.distributed as dist

        started = time.perf_counter()
        rt, reqs, parts = self.rt, [], []
        if send is not None:
            tensor, step = send
            other, stage = self._neighbour(step)
            for peer, lo, hi in self._pieces(rt.mesh, rt.stage, other, stage, sending=True):
                piece = tensor[:, lo:hi].to("cpu").contiguous()  # gloo: through host memory
                reqs.append(dist.isend(piece, peer, group=rt.border_group))
        if recv is not None:
            shape, step, _ = recv
            other, stage = self._neighbour(step)
            for peer, lo, hi in self._pieces(rt.mesh, rt.stage, other, stage, sending=False):
                buffer = torch.empty((shape[0], hi - lo, *shape[2:]), dtype=self.dtype)
                reqs.append(dist.irecv(buffer, peer, group=rt.border_group))
                parts.append(buffer)
        for req in reqs:
            if req is not None:
                req.wait()
        self.seconds += time.perf_counter() - started
        self.exchanges += 1
        if recv is None:
            return None
        received = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        received = received.to(self.device) if self.device is not None else received
        scale = recv[2]
        return received * scale if scale != 1 else received

    def _shape(self, tensor_shapes):
        shape = tensor_shapes if _single(tensor_shapes) else tensor_shapes[0]
        return (shape[0], self.rt.mesh.mbs, *shape[2:])

    def _grad_scale(self) -> float:
        later, _ = self._neighbour(1)
        return self.rt.mesh.dp / later.dp

    @staticmethod
    def _one(tensors):
        return tensors[0] if isinstance(tensors, list) else tensors

    def recv_forward(self, tensor_shapes, is_first_stage: bool):
        tensor = None
        if not is_first_stage:
            tensor = self._ops(None, (self._shape(tensor_shapes), -1, 1.0)).requires_grad_()
        return tensor if _single(tensor_shapes) else [tensor]

    def recv_backward(self, tensor_shapes, is_last_stage: bool):
        grad = None
        if not is_last_stage:
            grad = self._ops(None, (self._shape(tensor_shapes), 1, self._grad_scale()))
        return grad if _single(tensor_shapes) else [grad]

    def send_forward(self, output_tensors, is_last_stage: bool) -> None:
        if not is_last_stage:
            self._ops((self._one(output_tensors).detach(), 1), None)

    def send_backward(self, input_tensor_grads, is_first_stage: bool) -> None:
        if not is_first_stage:
            self._ops((self._one(input_tensor_grads), -1), None)

    def send_forward_recv_backward(self, output_tensors, tensor_shapes, is_last_stage: bool):
        grad = None
        if not is_last_stage:
            send = (self._one(output_tensors).detach(), 1)
            grad = self._ops(send, (self._shape(tensor_shapes), 1, self._grad_scale()))
        return [grad] if isinstance(output_tensors, list) else grad

    def send_backward_recv_forward(self, input_tensor_grads, tensor_shapes, is_first_stage: bool):
        tensor = None
        if not is_first_stage:
            send = (self._one(input_tensor_grads), -1)
            tensor = self._ops(send, (self._shape(tensor_shapes), -1, 1.0)).requires_grad_()
        return [tensor] if isinstance(input_tensor_grads, list) else tensor


def _single(tensor_shapes) -> bool:
    """One shape (a list or tuple of ints), not a list of shapes: as megatron's p2p tells them apart."""
    return all(isinstance(x, int) for x in tensor_shapes)


class Batches:
    """The micro-batches of one rank in a hetero job: pipeline micro-batch j of iteration `it` is samples
    it x G + [j x P, (j + 1) x P) with P = DP x micro-batch (the same on every mesh), and DP rank d takes its
    [d x mbs, (d + 1) x mbs) of them, so every stage sees the same samples of micro-batch j."""

    def __init__(self, dataset, global_batch: int, rt: Runtime) -> None:
        from flagscale.train.data import Batches as Plain

        self.global_batch, self.rt = global_batch, rt
        # one micro-batch of samples [k x mbs, (k + 1) x mbs) is the plain reader's "iteration" k
        self._plain = Plain(dataset, rt.mesh.mbs, rt.mesh.mbs, 1, 0)

    def microbatches(self, iteration: int):
        mbs, per_micro = self.rt.mesh.mbs, self.rt.layout.samples_per_microbatch
        for first in range(iteration * self.global_batch, (iteration + 1) * self.global_batch, per_micro):
            yield from self._plain.microbatches((first + self.rt.dp_rank * mbs) // mbs)


# ---------------------------------------------------------------------------------------------- checkpoints
def check_checkpoint(saved_layout, source) -> None:
    """A run whose meshes differ reads checkpoints with per-layer keys (saved by such a run), any other run
    checkpoints with stacked layers: one line saying which, not a missing-key error from deep in megatron."""
    per_layer = isinstance(saved_layout, dict) and "hetero" in saved_layout
    if per_layer and active() is None:
        raise ConfigError(
            f"checkpoint {source} was saved by a hetero run with meshes of different layouts (one key per layer); "
            "this run's meshes are all alike: load it with such meshes (docs/hetero.md, checkpoints)"
        )
    if not per_layer and active() is not None:
        raise ConfigError(
            f"checkpoint {source} has stacked layers (a homogeneous run's, or an import's); a hetero run with "
            "meshes of different layouts loads only its own kind (docs/hetero.md, checkpoints)"
        )


def unstack_layers(state):
    """A model's sharded state dict with every transformer layer under its own keys.

    megatron.core saves the layers of a block as one tensor per parameter name with a leading layer axis, so all
    layers must be split alike over TP; in a hetero job they are not (mesh A's layers over 2 TP ranks, mesh B's
    over 1). Each layer's slice of that axis becomes its own tensor (`decoder.layers.<i>.<name>`), which may be split
    as its mesh splits it. The optimizer's states follow (they are keyed after the model's)."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def unstacked(value):
        if isinstance(value, ShardedTensor) and value.prepend_axis_num >= 1 and ".layers." in value.key:
            layer = value.global_offset[0]
            head, _, tail = value.key.partition(".layers.")
            return replace(
                value,
                key=f"{head}.layers.{layer}.{tail}",
                global_shape=value.global_shape[1:],
                global_offset=value.global_offset[1:],
                axis_fragmentations=value.axis_fragmentations[1:],
                prepend_axis_num=value.prepend_axis_num - 1,
            )
        if isinstance(value, ShardedTensorFactory):
            build = value.build_fn
            return replace(value, build_fn=lambda *args: walk(build(*args)))
        return value

    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return unstacked(value)

    return walk(state)
