"""The training driver: what torchrun runs on every rank (`python -m flagscale.train.driver --config F`).

Megatron Core only (its release has no `megatron/training`): GPTModel from the task settings with the
local layer spec, Megatron DDP, Megatron's optimizer and its LR/weight-decay scheduler, the pipeline
schedule (`get_forward_backward_func`, which also does gradient accumulation over micro-batches),
GPTDataset over an indexed dataset, and distributed checkpointing. bf16/fp16 wrap the model as
Megatron-LM does (Float16Module + a mixed-precision optimizer with fp32 main weights).

`F` is the JSON the launcher wrote: the validated `train` settings with absolute paths. The device
type and collective backend come from the device manifest through MEGATRON_DEVICE_TYPE /
MEGATRON_COLLECTIVE_BACKEND, read by the patched megatron-core.

Logs: a Megatron-style line per logged iteration on the console (from the rank that has the loss),
every rank's own log in <exp_dir>/logs/node<N>/rank<R>.log, and one JSON line per logged iteration
in the metrics file (iteration, loss, lr, grad_norm, step_time, tokens_per_sec, memory_gib), the same
scalars in TensorBoard event files beside it and in Weights & Biases when configured (flagscale.train.metrics).
Every rank records the bytes of its parameters, gradient buffers and optimizer states and its peak resident memory
in <exp_dir>/logs/memory/rank<R>.json after its first iteration and at the end (the memory model's measurement).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from flagscale.train.settings import TrainSettings, train_settings

log = logging.getLogger("flagscale.train")


def _setup_logging(exp_dir: Path, rank: int, console: bool) -> None:
    node = os.environ.get("GROUP_RANK", "0")
    folder = exp_dir / "logs" / f"node{node}"
    folder.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(folder / f"rank{rank}.log")]
    if console:
        handlers.append(logging.StreamHandler(sys.stdout))
    fmt = logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def _dtype_flags(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def transformer_config(t: TrainSettings, **overrides):
    """megatron.core's TransformerConfig of the run: the family's model arguments (flagscale.train.families),
    the parallel layout and precision, and the portable settings every device runs."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    from flagscale.train import families

    s = t.system
    dtype = _dtype_flags(s.precision)
    kwargs = dict(
        **families.transformer_config_kwargs(t.model),
        tensor_model_parallel_size=s.tensor_model_parallel_size,
        pipeline_model_parallel_size=s.pipeline_model_parallel_size,
        expert_model_parallel_size=s.expert_model_parallel_size,
        sequence_parallel=t.sequence_parallel,  # None resolved: on for MoE with TP > 1, which megatron requires
        recompute_granularity=s.recompute_granularity,
        recompute_method=s.recompute_method,
        recompute_num_layers=t.recompute_layers,
        bf16=s.precision == "bf16",
        fp16=s.precision == "fp16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Portable settings: CPU-side init and no fused kernels (the local spec, no TransformerEngine).
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    kwargs.update(overrides)
    return (MLATransformerConfig if t.model.mla is not None else TransformerConfig)(**kwargs)


def gpt_model(t: TrainSettings, vocab_size: int, config):
    """This pipeline stage's GPTModel of the run's family (no DDP or precision wrapper)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from flagscale.train import families

    return GPTModel(
        config=config,
        transformer_layer_spec=families.layer_spec(t.model, config),
        **families.gpt_model_kwargs(t.model, vocab_size),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def build_model(t: TrainSettings, vocab_size: int, **config_overrides):
    """GPTModel (+ Float16Module for bf16/fp16) wrapped in Megatron DDP, and its TransformerConfig
    (`config_overrides`: a hetero mesh's layout)."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    s = t.system
    config = transformer_config(t, **config_overrides)
    model = gpt_model(t, vocab_size, config)
    if t.model.lora is not None:  # base weights frozen before DDP and the optimizer see them
        from flagscale.train import lora

        adapted = lora.apply(model, lora.record(t.model.lora))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info(f"LoRA: {len(adapted)} layers adapted; {trainable} of {total} parameters of this rank train")
    if s.precision != "fp32":
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=s.precision != "fp32", use_distributed_optimizer=s.use_distributed_optimizer
    )
    model = DistributedDataParallel(config, ddp_config, model)
    if s.precision != "fp32":
        torch.set_default_dtype(torch.float32)
    return model, config


def build_optimizer(t: TrainSettings, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s, m, o = t.system, t.model, t.model.optimizer
    config = OptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=s.precision == "bf16",
        fp16=s.precision == "fp16",
        params_dtype=_dtype_flags(s.precision),
        use_distributed_optimizer=s.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [model])
    decay = o.decay_iters or m.train_iters
    # Steps are iterations (Megatron-LM counts samples; the curve is the same, scaled).
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_iters else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters,
        lr_decay_steps=max(decay, o.warmup_iters + 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=m.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def checkpoint_source(t: TrainSettings) -> tuple[str | None, bool]:
    """Where the run starts from, and whether it takes model weights only (finetune) or resumes everything.

    finetune: `load`'s weights, unless `save` already holds a checkpoint of this run (then resume that);
    otherwise `load`, else `save`, when it holds a checkpoint (as Megatron-LM)."""
    from flagscale.train import checkpoint

    ckpt = t.system.checkpoint
    if ckpt.finetune:
        if ckpt.save and checkpoint.latest_iteration(ckpt.save) is not None:
            return ckpt.save, False
        checkpoint.latest_dir(ckpt.load or "")  # a clear error when `load` holds no checkpoint
        return ckpt.load, True
    load_from = ckpt.load or ckpt.save
    if load_from and checkpoint.latest_iteration(load_from) is not None:
        return load_from, False
    return None, False


def vocabulary(t: TrainSettings, tokenizer_vocab: int, recorded: dict | None, source: str | None) -> tuple[int, int]:
    """The model's vocabulary and its padded size (rows of the embedding and output layer).

    `train.model.vocab_size` (an HF model's, which may exceed its tokenizer's), else the tokenizer's. Padded as
    Megatron-LM pads (a multiple of make_vocab_size_divisible_by x TP), except that a loaded checkpoint's padded
    size wins when this layout can split it: any TP can then start from a checkpoint made in another."""
    from flagscale.errors import ConfigError
    from flagscale.train import families
    from flagscale.train.hetero import padding_tp
    from flagscale.train.tokenizer import padded_vocab_size

    m, tp = t.model, padding_tp(t)
    vocab = m.vocab_size or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(f"train.model.vocab_size={vocab} is below the tokenizer's vocabulary ({tokenizer_vocab})")
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, tp)
    if recorded is None:
        return vocab, padded
    differ = families.differences(recorded.get("architecture", {}), m)
    if differ:
        raise ConfigError(f"checkpoint {source} holds another model: " + ", ".join(differ) + "; set train.model so")
    saved = recorded.get("padded_vocab_size")
    if saved and saved != padded:
        if saved % tp or saved < vocab:
            raise ConfigError(
                f"checkpoint {source} has a padded vocabulary of {saved} rows, which tensor_model_parallel_size="
                f"{tp} cannot split evenly over a vocabulary of {vocab}"
            )
        padded = saved
    return vocab, padded


def model_info(t: TrainSettings, vocab: int, padded: int, recorded: dict | None) -> dict:
    """What checkpoints record about the model; the Hugging Face source of a loaded one is carried along."""
    from flagscale.train import families

    info = {
        "family": t.model.family,
        "architecture": families.architecture(t.model),
        "vocab_size": vocab,
        "padded_vocab_size": padded,
        "max_position_embeddings": t.model.max_position_embeddings or t.model.seq_length,
    }
    if recorded and "hf" in recorded:
        info["hf"] = recorded["hf"]
    if t.model.lora is not None:  # export rebuilds the adapters from this
        from flagscale.train import lora

        info["lora"] = lora.record(t.model.lora)
    return info


def _heartbeat(payload: dict, exp_dir: Path, rank: int):
    """This rank's heartbeat writer (flagscale.runner.heartbeat), read by the job monitor."""
    from flagscale.runner.heartbeat import Heartbeat

    ft = payload.get("experiment", {}).get("runner", {}).get("fault_tolerance", {})
    return Heartbeat(exp_dir, rank, int(os.environ.get("GROUP_RANK", "0")), float(ft.get("heartbeat_interval", 1.0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flagscale.train.driver")
    parser.add_argument("--config", required=True, type=Path, help="train.json written by the launcher")
    args = parser.parse_args(argv)
    payload = json.loads(args.config.read_text())
    t = train_settings(payload["train"])
    exp_dir = Path(payload["exp_dir"])
    started = time.perf_counter()

    import megatron.core
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flagscale.train import checkpoint, hetero
    from flagscale.train.data import Batches, build_train_dataset
    from flagscale.train.metrics import MemoryRecord, MetricsLog, memory_gib
    from flagscale.train.tokenizer import build_tokenizer

    try:  # the FlagScale device accessor of the patched megatron-core
        from megatron.core import device_utils

        device_type, backend = device_utils.get_device_type(), device_utils.default_collective_backend()
    except ImportError:
        device_type, backend = ("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")

    s, m = t.system, t.model
    if s.deterministic:  # CUDA's cuBLAS needs a fixed workspace for it; harmless elsewhere
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if device_type not in ("cpu",):
        getattr(torch, device_type).set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    else:  # run by hand, without torchrun: one process
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    hetero_rt = None
    if s.hetero is not None:  # meshes of their own layouts (flagscale/train/hetero.py)
        hetero_rt = hetero.initialize(t, rank)
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=s.tensor_model_parallel_size,
            pipeline_model_parallel_size=s.pipeline_model_parallel_size,
            expert_model_parallel_size=s.expert_model_parallel_size,
        )
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    last_stage = parallel_state.is_pipeline_last_stage()
    reporter = last_stage and parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
    _setup_logging(exp_dir, rank, console=reporter or rank == 0)
    heartbeat = _heartbeat(payload, exp_dir, rank)
    heartbeat.beat(0, phase="init", force=True)
    if rank == 0:
        log.info(
            f"flagscale train: megatron-core {megatron.core.__version__} ({Path(megatron.core.__file__).parent}), "
            f"device {device_type}, backend {dist.get_backend()}, world size {world_size} "
            + (
                f"(hetero: {hetero_rt.describe()}), "
                if hetero_rt
                else f"(TP={s.tensor_model_parallel_size} PP={s.pipeline_model_parallel_size} DP={dp}), "
            )
            + f"precision {s.precision}"
        )

    torch.manual_seed(s.seed)  # the same on every rank: CPU-initialized weights equal across layouts
    tensor_parallel.model_parallel_cuda_manual_seed(s.seed)
    tokenizer = build_tokenizer(t.data.tokenizer.type, t.data.tokenizer.path)
    ckpt = s.checkpoint
    load_from, weights_only = checkpoint_source(t)
    common = checkpoint.common_state(load_from) if load_from else None
    recorded = checkpoint.model_info(common) if common is not None else None
    if common is not None and s.hetero is not None:  # per-layer keys (hetero) or stacked layers: only the own kind
        hetero.check_checkpoint(common.get(checkpoint.LAYOUT), load_from)
    vocab, padded = vocabulary(t, tokenizer.vocab_size, recorded, load_from)
    memory = MemoryRecord(
        exp_dir,
        rank,
        {
            "stage": parallel_state.get_pipeline_model_parallel_rank(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "dp_rank": dp_rank,
        },
    )  # the resident memory before the model: the baseline of the measured peak
    model, config = build_model(t, padded, **(hetero_rt.config_overrides() if hetero_rt else {}))
    config.no_sync_func = model.no_sync  # as Megatron-LM: the schedule reduces DP grads via these hooks
    config.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = build_optimizer(t, model)
    if hetero_rt:
        hetero.adjust_optimizer(optimizer, hetero_rt)

    start_iter = 0
    if load_from and weights_only:
        path = checkpoint.load_weights(load_from, model)
        if rank == 0:
            log.info(f"finetuning from the model weights of {path} (iteration 0, a fresh optimizer)")
    elif load_from:
        start_iter, rng_note = checkpoint.load(load_from, model, optimizer, scheduler)
        if rank == 0:
            log.info(
                f"resumed from {checkpoint.iteration_dir(load_from, start_iter)} (iteration {start_iter})"
                + (" with its RNG state" if rng_note is None else "")
            )
            if rng_note:
                log.info(rng_note)
    info = model_info(t, vocab, padded, recorded)

    dataset = build_train_dataset(t, tokenizer, exp_dir / "cache" / "data")
    mbs = hetero_rt.micro_batch_size if hetero_rt else m.micro_batch_size
    batches: hetero.Batches | Batches = (
        hetero.Batches(dataset, m.global_batch_size, hetero_rt)
        if hetero_rt
        else Batches(dataset, m.global_batch_size, mbs, dp, dp_rank)
    )
    num_micro = m.global_batch_size // (dp * mbs)
    forward_backward = get_forward_backward_func()
    schedule_arguments = hetero.schedule_arguments(hetero_rt, config) if hetero_rt else {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        mask = batch["loss_mask"].float().view(-1)

        def loss_func(per_token_loss):
            loss = (per_token_loss.float().view(-1) * mask).sum() / mask.sum().clamp(min=1.0)
            # clone: the schedule divides the returned loss in place by the number of micro-batches
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    # the launcher always sets metrics_file (default <exp_dir>/logs/metrics.jsonl); TensorBoard/W&B beside it
    metrics = MetricsLog(s.logging, exp_dir, start_iter, payload["train"]) if reporter else None
    tokens_per_iter = m.global_batch_size * m.seq_length
    last_saved = start_iter
    heartbeat.beat(start_iter, phase="start", force=True)
    if rank == 0:
        log.info(
            f"training iterations {start_iter + 1}..{m.train_iters}, {num_micro} micro-batch(es) of "
            f"{mbs} per step per DP rank, global batch {m.global_batch_size}"
        )
    for it in range(start_iter, m.train_iters):
        t0 = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=batches.microbatches(it),
            model=[model],
            num_microbatches=num_micro,
            seq_length=m.seq_length,
            micro_batch_size=mbs,
            forward_only=False,
            **schedule_arguments,
        )
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        iteration = it + 1
        logged = iteration % s.logging.log_interval == 0 or iteration == m.train_iters
        if logged and last_stage:
            loss = torch.stack([x["lm loss"] for x in losses]).mean()
            dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss = float(loss) / dp
        step_time = time.perf_counter() - t0
        if logged and metrics is not None:
            lr = optimizer.param_groups[0]["lr"]
            gn = float(grad_norm) if grad_norm is not None else float("nan")
            log.info(
                f" iteration {iteration:8d}/{m.train_iters:8d} | consumed samples: "
                f"{iteration * m.global_batch_size:10d} | step time (ms): {step_time * 1000:8.1f} | "
                f"tokens/s: {tokens_per_iter / step_time:10.1f} | lr: {lr:.4E} | lm loss: {loss:.6E} | "
                f"grad norm: {gn:.4f} |"
            )
            metrics.write(
                {
                    "iteration": iteration,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": gn,
                    "step_time": step_time,
                    "tokens_per_sec": tokens_per_iter / step_time,
                    "memory_gib": memory_gib(),
                    "skipped": not ok,
                }
            )
            heartbeat.extra.update(loss=loss, tokens_per_sec=tokens_per_iter / step_time)
        if iteration == start_iter + 1 or iteration == m.train_iters:
            memory.write(iteration, model, optimizer)
        heartbeat.beat(iteration, force=iteration == m.train_iters)
        if ckpt.save and ckpt.save_interval and iteration % ckpt.save_interval == 0:
            heartbeat.beat(iteration, phase="save", force=True)  # a long save is progress, not a hang
            path = checkpoint.save(ckpt.save, iteration, model, optimizer, scheduler, info, ckpt.keep_last)
            last_saved = iteration
            if rank == 0:
                log.info(f"saved checkpoint {path}")
    if ckpt.save and ckpt.save_at_end and last_saved != m.train_iters and start_iter < m.train_iters:
        path = checkpoint.save(ckpt.save, m.train_iters, model, optimizer, scheduler, info, ckpt.keep_last)
        if rank == 0:
            log.info(f"saved checkpoint {path}")
    if metrics:
        metrics.close()
    if "p2p_communicator" in schedule_arguments:  # where a hetero step's time goes (benchmarks/bench_hetero.py)
        border = schedule_arguments["p2p_communicator"]
        log.info(f"hetero borders: {border.exchanges} exchanges, {border.seconds:.3f} s waiting on them")
    heartbeat.beat(m.train_iters, phase="done", force=True)
    dist.barrier()
    if rank == 0:
        log.info(f"done in {time.perf_counter() - started:.1f} s")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
