"""Train a tiny GPT with Megatron Core's own pieces on the CPU; one JSON line per training step.

Megatron Core only (no Megatron-LM training loop): GPTModel from a TransformerConfig with the local
(non-TransformerEngine) layer spec, Megatron DDP, Megatron's optimizer (get_megatron_optimizer) and
Megatron's pipeline schedule (get_forward_backward_func). Data is synthetic and deterministic: every
sequence counts up from a random start by a per-sequence stride (x[t+1] = x[t] + k mod vocab), which a
model can learn from context, so the loss falls within a few steps.

World size, rank and rendezvous come from torchrun's environment; run plainly it is world size 1
(an in-memory store, no networking). The tensor and pipeline sizes come from the arguments; the
data-parallel size is what is left. The global batch is fixed whatever the layout, so with dropout
off the losses of every layout that initializes the same weights (TP, DP) match world size 1's.

Output (stdout), one JSON object per line:
  {"event": "start", "megatron_core": <path of megatron.core>, "device_type": ..., "backend": ..., ...}
  {"event": "step", "step": i, "loss": <global-batch mean loss>, "grad_norm": ...}   (one rank only)
  {"event": "done", "seconds": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--experts", type=int, default=0, help="MoE experts per MoE layer (0: dense MLP)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--topk", type=int, default=2, help="experts each token is routed to")
    p.add_argument("--dispatcher", choices=("allgather", "alltoall"), default="allgather")
    p.add_argument("--shared-expert", type=int, default=0, help="shared expert FFN size (0: none)")
    p.add_argument("--mla", action="store_true", help="multi-latent attention (DeepSeek-V2/V3)")
    p.add_argument(
        "--router",
        choices=("softmax", "sigmoid"),
        default="softmax",
        help="router score function (sigmoid with expert bias: DeepSeek-V3)",
    )
    return p.parse_args(argv)


def emit(**record) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def synthetic_batch(step: int, args: argparse.Namespace):
    """The global batch of `step`: [global_batch, seq + 1] token ids, the same on every rank."""
    import torch

    g = torch.Generator().manual_seed(args.seed * 1000 + step)
    start = torch.randint(0, args.vocab, (args.global_batch, 1), generator=g)
    stride = torch.randint(1, 4, (args.global_batch, 1), generator=g)
    return (start + stride * torch.arange(args.seq + 1).unsqueeze(0)) % args.vocab


def moe_settings(args: argparse.Namespace) -> dict:
    """TransformerConfig fields of the MoE layers (none for a dense model)."""
    if not args.experts:
        return {}
    settings = dict(
        num_moe_experts=args.experts,
        expert_model_parallel_size=args.ep,
        moe_router_topk=args.topk,
        moe_token_dispatcher_type=args.dispatcher,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_ffn_hidden_size=args.hidden * 2,
        moe_shared_expert_intermediate_size=args.shared_expert or None,
        moe_router_dtype="fp32",
        add_bias_linear=False,  # as the MoE families (Mixtral, Qwen3-MoE, DeepSeek): expert TP needs no bias
        sequence_parallel=args.tp > 1,  # Megatron refuses MoE training with TP but without SP
    )
    if args.router == "sigmoid":
        settings.update(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=1e-3,
            moe_router_load_balancing_type="seq_aux_loss",
        )
    return settings


def mla_settings(args: argparse.Namespace) -> dict:
    """MLATransformerConfig fields: low-rank compressed queries and keys/values, decoupled RoPE heads."""
    head = args.hidden // args.heads
    return dict(
        q_lora_rank=args.hidden // 2,
        kv_lora_rank=args.hidden // 2,
        qk_head_dim=head,
        qk_pos_emb_head_dim=head // 2,
        v_head_dim=head,
        rope_type="rope",
        normalization="RMSNorm",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()

    import megatron.core
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    try:  # FlagScale's device accessor (patched megatron-core); upstream has none
        from megatron.core import device_utils
    except ImportError:
        device_utils = None
    device_type = device_utils.get_device_type() if device_utils else "unknown (unpatched)"
    backend = device_utils.default_collective_backend() if device_utils else "gloo"

    torch.use_deterministic_algorithms(True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if "MASTER_ADDR" in os.environ:  # torchrun
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=rank, world_size=world_size)
    if rank == 0:
        emit(
            event="start",
            megatron_core=megatron.core.__file__,
            megatron_version=megatron.core.__version__,
            device_type=device_type,
            backend=dist.get_backend(),
            world_size=world_size,
            tp=args.tp,
            pp=args.pp,
            torch=torch.__version__,
        )

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, expert_model_parallel_size=args.ep
    )
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    assert args.global_batch % (dp * args.micro_batch) == 0, "global batch must split over DP x micro batch"
    num_microbatches = args.global_batch // (dp * args.micro_batch)
    # The same seed on every rank: the CPU-initialized weights of a TP or DP layout equal world size 1's.
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)

    config_class, attention = (MLATransformerConfig, mla_settings(args)) if args.mla else (TransformerConfig, {})
    config = config_class(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        **moe_settings(args),
        **attention,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=args.experts or None, moe_grouped_gemm=False, multi_latent_attention=args.mla
        ),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        position_embedding_type="rope",
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    # As Megatron-LM's training loop: the schedule all-reduces the DP gradients through these hooks.
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=1.0), [model])
    forward_backward = get_forward_backward_func()

    positions = torch.arange(args.seq).unsqueeze(0).expand(args.micro_batch, args.seq)
    causal_mask = torch.triu(torch.ones(1, 1, args.seq, args.seq, dtype=torch.bool), diagonal=1)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens[:, :-1], positions, causal_mask, labels=tokens[:, 1:])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            # clone: the schedule divides the returned loss in place by the number of microbatches
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    reporter = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and dp_rank == 0
    )
    for step in range(args.steps):
        batch = synthetic_batch(step, args)
        local = batch.chunk(dp)[dp_rank]
        microbatches = iter(local.split(args.micro_batch))
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=microbatches,
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=args.seq,
            micro_batch_size=args.micro_batch,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        if parallel_state.is_pipeline_last_stage():
            loss = torch.stack([m["lm loss"] for m in losses]).mean()
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= dp
            if reporter:
                emit(event="step", step=step, loss=float(loss), grad_norm=float(grad_norm))

    dist.barrier()
    if rank == 0:
        emit(event="done", seconds=round(time.perf_counter() - t0, 3))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
