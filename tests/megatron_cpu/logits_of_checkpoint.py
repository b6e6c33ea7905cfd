"""The logits megatron.core computes for a checkpoint's model on a batch of token ids (test helper).

    [torchrun --nproc-per-node TPxEP] logits_of_checkpoint.py CKPT_DIR TOKENS.json OUT.pt [--tp TP] [--ep EP]

Builds the model the checkpoint records (flagscale.checkpoint.worker.model_of: the same TransformerConfig and
GPTModel as `flagscale train`), loads its weights with distributed checkpointing (any saved layout), runs one
forward pass over the tokens ([batch, seq] in TOKENS.json) with a causal mask, gathers the vocabulary-parallel
logits of every tensor-parallel rank and saves them (fp32, the padding rows dropped) from rank 0 as a
[batch, seq, vocab] tensor. World size = TP x EP (PP=1; with EP, a MoE model's experts are split over EP
data-parallel ranks, every one of which runs the same batch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("tokens", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from flagscale.checkpoint import worker
    from flagscale.train import checkpoint

    worker.start(args.tp, 1, args.ep)
    info = checkpoint.model_info(checkpoint.common_state(args.checkpoint))
    model = worker.model_of(info, tp=args.tp, ep=args.ep)
    checkpoint.load_weights(args.checkpoint, model)
    model.eval()
    tokens = torch.tensor(json.loads(args.tokens.read_text()))
    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    causal = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = model(tokens, positions, causal)  # [batch, seq, padded vocab / TP]
        # torch's all_gather: megatron's gather_from_tensor_model_parallel_region allocates on CUDA
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    if dist.get_rank() == 0:
        torch.save(logits[..., : info["vocab_size"]].float().contiguous(), args.out)
        layout = {"tp": parallel_state.get_tensor_model_parallel_world_size(), "ep": args.ep}
        print(json.dumps({**layout, "shape": list(logits.shape)}))
    worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
