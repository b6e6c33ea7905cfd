"""How much memory every rank of a `flagscale train` run needs: the memory model of `action=dryrun` and the tuner.

Per rank, in bytes:

* parameters: the rank's weights (flagscale.train.shapes, exact) in the run's precision. With the distributed
  optimizer megatron DDP moves them into one contiguous buffer per (dense | expert) group, padded as it pads it.
* gradients: megatron DDP's main_grad buffers, fp32 whatever the precision (the driver reduces bf16/fp16 grads in
  fp32), padded the same way.
* optimizer: Adam's exp_avg and exp_avg_sq (SGD: the momentum buffer) in fp32, plus the fp32 main copy of bf16/fp16
  weights; with the distributed optimizer only this rank's shard of each bucket (megatron splits every padded
  bucket into DP equal shards; a parameter's states cover its part of the shard, padding excluded). The 4-byte
  `step` scalar torch keeps per tensor is left out.
* activations: what the forward pass keeps for the backward pass, per micro-batch and layer, times the
  micro-batches a pipeline stage holds at once (1F1B: PP - stage, at most the micro-batches of a step), plus the
  logits of the last stage, one layer's worth of recomputation and megatron's attention score buffer. The
  formula follows "Reducing Activation Recomputation in Large Transformer Models" (Korthikanti et al., 2022) as
  megatron.core's local layer spec really stores tensors on the CPU (no fused kernels, no flash attention); each
  term says which tensor it is. The live bytes are then scaled by ALLOCATOR_FACTOR, what the CPU's resident peak
  holds per live byte (measured with benchmarks/bench_memory.py), plus a fixed runtime overhead.

Parameters, gradients and optimizer states are exact (tests/test_memory.py compares them with what the driver
allocated, <exp_dir>/logs/memory/rank<R>.json); activations are an estimate (see the benchmark's table).

Pure arithmetic: no torch, no megatron.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flagscale.train.families import ffn_size, head_dim, query_groups, structure
from flagscale.train.settings import TrainSettings
from flagscale.train.shapes import Tensor, stage_tensors
from flagscale.train.tokenizer import padded_vocab_size

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GRAD_BYTES = 4  # main_grad buffers: fp32 for fp32 weights, and reduced in fp32 for bf16/fp16 ones
STATE_BYTES = 4  # optimizer states and main weights are fp32
# Resident memory a rank adds beside its tensors once it trains (gloo buffers, autograd and allocator bookkeeping,
# the dataset's index, lazily imported code), measured on the tiny models of the tests (~32 MiB, whatever the size).
RUNTIME_OVERHEAD = 32 * 2**20
# What a rank's peak resident memory holds per byte of live activations, measured on the CPU (bench_memory.py, 8
# layouts: 1.5-2.1, median 1.85). The activations are many 1-32 MiB tensors freed and made again every micro-batch;
# glibc serves them from its heap once its dynamic mmap threshold has risen past their size and keeps the freed
# space, so the high-water mark counts live tensors plus the allocator's free holes and transient copies (gloo's
# collective buffers, Adam's per-tensor temporaries). An accelerator's caching allocator would start near 1.
ALLOCATOR_FACTOR = 1.8


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory in bytes; rank order is megatron's (TP fastest, then DP, then PP stages)."""

    rank: int
    stage: int
    tp_rank: int
    dp_rank: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass(frozen=True)
class _Buffer:
    """A megatron DDP param/grad buffer: its padded size and, per shard rank, the parameter elements in the shard."""

    numel: int
    shard_elements: tuple[int, ...]


def _pad(n: int, divisor: int) -> int:
    return math.ceil(n / divisor) * divisor


def ddp_buffer(tensors: list[Tensor], dp: int, distributed: bool) -> _Buffer:
    """Lay `tensors` out as megatron's _ParamAndGradBuffer does (bucket_size None: the driver does not overlap the
    gradient reduction): in reverse order; with the distributed optimizer each parameter starts at a multiple of 64
    elements, a pipeline-shared embedding gets a bucket of its own, and every bucket ends at a multiple of
    lcm(DP, 128) and is split into DP equal shards."""
    if not distributed:
        total = sum(t.numel for t in tensors)
        return _Buffer(total, (total,) * dp)
    divisor = math.lcm(dp, 128)
    buckets: list[tuple[int, int, list[tuple[int, int]]]] = []
    start = bucket_start = 0
    ranges: list[tuple[int, int]] = []

    def close(end: int) -> int:
        nonlocal bucket_start, ranges
        padded = _pad(end, divisor)
        buckets.append((bucket_start, padded, ranges))
        bucket_start, ranges = padded, []
        return padded

    for t in reversed(tensors):
        start = _pad(start, 64)
        if t.shared_embedding and ranges:
            start = close(start)
        ranges.append((start, start + t.numel))
        start += t.numel
        if t.shared_embedding:
            start = close(start)
    if ranges:
        start = close(start)
    shards = []
    for r in range(dp):
        elements = 0
        for lo, hi, params in buckets:
            size = (hi - lo) // dp
            s_lo, s_hi = lo + r * size, lo + (r + 1) * size
            elements += sum(max(0, min(b, s_hi) - max(a, s_lo)) for a, b in params)
        shards.append(elements)
    return _Buffer(start, tuple(shards))


def _optimizer_bytes(t: TrainSettings, elements: int) -> int:
    """Optimizer memory for `elements` parameter elements: states, and fp32 main weights of bf16/fp16 ones."""
    states = 2 if t.model.optimizer.name == "adam" else 1  # Adam: exp_avg, exp_avg_sq; SGD: momentum
    main = 1 if t.system.precision != "fp32" else 0
    return (states + main) * STATE_BYTES * elements


# ------------------------------------------------------------------------------------------ activations
def _layer_activations(t: TrainSettings, moe: bool) -> float:
    """Bytes one transformer layer keeps for the backward pass, per micro-batch (no recomputation)."""
    m, s = t.model, t.system
    tp, act = s.tensor_model_parallel_size, PRECISION_BYTES[s.precision]
    sp = tp if t.sequence_parallel else 1
    st = structure(m.family)
    tokens = m.seq_length * m.micro_batch_size
    h, heads = m.hidden_size, m.num_attention_heads
    # Replicated over TP ranks unless sequence-parallel: the input norm's input (the residual stream), the fused
    # QKV projection's input (the norm's output; under SP megatron keeps the local part and gathers it again in the
    # backward pass), the same pair before the MLP.
    elements = 4 * h / sp
    if m.mla is not None:
        a = m.mla
        q_head = a.qk_head_dim + a.qk_pos_emb_head_dim
        # down-projection outputs (latents) and their norms, up-projection outputs, RoPE'd query/key, values, context
        latents = (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_pos_emb_head_dim
        elements += 2 * latents + heads * (3 * q_head + a.qk_head_dim + 2 * a.v_head_dim) / tp
    else:
        hd, groups = head_dim(m), query_groups(m)
        # the QKV output (the values stay views of it), the RoPE'd queries and keys, and the attention context
        # (linear_proj's input)
        elements += ((heads + 2 * groups) + (heads + groups) + heads) * hd / tp
    if s.recompute_granularity != "selective":
        elements += heads * m.seq_length / tp  # softmax(QK^T): a row of sequence length per head (no flash)
    if moe:
        elements += _moe_activations(t, tokens) / tokens
    else:
        ffn = ffn_size(m)
        # SwiGLU: fc1's output (both halves stay: SiLU's input and the gate), SiLU's output and the product (fc2's
        # input); GeLU: fc1's output (GeLU's input) and GeLU's output
        elements += (4 if st.swiglu else 2) * ffn / tp
    return elements * tokens * act


def _moe_activations(t: TrainSettings, tokens: int) -> float:
    """A MoE MLP's elements per micro-batch: the router's logits and probabilities, and per routed token copy
    (tokens x top-k, spread evenly over the EP ranks so each rank computes as many as it sends): the permuted
    copy sent, the copy received and regrouped by expert, the expert's SwiGLU (as a dense MLP's, of the
    expert's size) and its output on the way back."""
    m, s = t.model, t.system
    e = m.moe
    assert e is not None
    tp = s.tensor_model_parallel_size
    sp = tp if t.sequence_parallel else 1
    local = tokens / sp
    ffn = e.ffn_hidden_size or ffn_size(m)
    routed = local * e.router_topk
    elements = local * 2 * e.num_experts + routed * (4 * m.hidden_size + 4 * ffn / tp)
    if e.shared_expert_ffn_hidden_size:
        elements += tokens * 4 * e.shared_expert_ffn_hidden_size / tp
    return elements


def _stage_activations(t: TrainSettings, stage: int, vocab: int, num_micro: int) -> int:
    """A stage's activation bytes at its peak: its in-flight micro-batches' layers, one layer being recomputed,
    the last stage's logits, the attention score buffer."""
    m, s = t.model, t.system
    tp, pp, act = s.tensor_model_parallel_size, s.pipeline_model_parallel_size, PRECISION_BYTES[s.precision]
    sp = tp if t.sequence_parallel else 1
    tokens = m.seq_length * m.micro_batch_size
    per_stage = m.num_layers // pp
    dense = m.moe.dense_layers if m.moe is not None else m.num_layers
    layers = [_layer_activations(t, moe=i >= dense) for i in range(stage * per_stage, (stage + 1) * per_stage)]
    kept = float(sum(layers))
    recompute = 0.0
    n = t.recompute_layers
    if n is not None:  # full recompute: a recomputed layer keeps only its input, rebuilt for its backward pass
        checkpoint_input = tokens * m.hidden_size / sp * act
        if s.recompute_method == "uniform":  # chunks of n layers, each keeping its first layer's input
            chunks = math.ceil(per_stage / n)
            kept = chunks * checkpoint_input
            recompute = max(sum(layers[i : i + n]) for i in range(0, per_stage, n))
        else:  # block: the first n layers of the stage
            kept = n * checkpoint_input + sum(layers[n:])
            recompute = max(layers[:n])
    in_flight = min(pp - stage, num_micro) if pp > 1 else 1
    total = in_flight * kept + recompute
    # megatron's attention score buffer (global memory buffer, kept and reused by every layer): b x heads/TP x s x s
    total += m.micro_batch_size * m.num_attention_heads / tp * m.seq_length**2 * act
    if stage == pp - 1:
        # the output layer's logits and the cross entropy's fp32 softmax of them (vocabulary split over TP)
        total += tokens * vocab / tp * (act + 4)
    return int(total * ALLOCATOR_FACTOR) + RUNTIME_OVERHEAD


# ------------------------------------------------------------------------------------------ entry
def estimate(train: TrainSettings, world_size: int, vocab_size: int) -> list[RankMemory]:
    """Every rank's memory (bytes), in rank order. `vocab_size` is the tokenizer's (or the model's), unpadded;
    `train.check(world_size)` must have passed."""
    s, m = train.system, train.model
    tp, pp, ep = s.tensor_model_parallel_size, s.pipeline_model_parallel_size, s.expert_model_parallel_size
    dp = world_size // (tp * pp)
    vocab_size = m.vocab_size or vocab_size  # the model's own wins, as in the driver
    num_micro = m.global_batch_size // (dp * m.micro_batch_size)
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
    dist = s.use_distributed_optimizer
    stages = []
    for stage in range(pp):
        tensors = stage_tensors(m, vocab_size, tp, pp, ep, stage)
        dense = ddp_buffer([x for x in tensors if not x.expert], dp, dist)
        expert = ddp_buffer([x for x in tensors if x.expert], dp // ep, dist)
        stages.append((dense, expert, _stage_activations(train, stage, padded, num_micro)))
    ranks = []
    for rank in range(world_size):
        tp_rank, dp_rank, stage = rank % tp, (rank // tp) % dp, rank // (tp * dp)
        dense, expert, activations = stages[stage]
        edp_rank = (rank // tp // ep) % (dp // ep)  # megatron's expert order: tp-ep-dp-pp
        numel = dense.numel + expert.numel
        shard = dense.shard_elements[dp_rank] + (expert.shard_elements[edp_rank] if expert.numel else 0)
        ranks.append(
            RankMemory(
                rank=rank,
                stage=stage,
                tp_rank=tp_rank,
                dp_rank=dp_rank,
                parameters=numel * PRECISION_BYTES[s.precision],
                gradients=numel * GRAD_BYTES,
                optimizer=_optimizer_bytes(train, shard),
                activations=activations,
            )
        )
    return ranks


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"
