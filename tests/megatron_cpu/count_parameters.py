"""Build one pipeline stage's GPTModel as `flagscale train` does and record how many parameters this rank holds.

    torchrun --nproc-per-node TP*PP*DP count_parameters.py MODEL_JSON TP PP VOCAB OUT_DIR [EP]

Writes OUT_DIR/rank<R>.json: {"stage": pipeline rank, "tp_rank": ..., "parameters": count}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from flagscale.train.driver import gpt_model, transformer_config
    from flagscale.train.settings import train_settings
    from flagscale.train.tokenizer import padded_vocab_size

    model, tp, pp, vocab, out = json.loads(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4])
    ep = int(argv[5]) if len(argv) > 5 else 1
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    system = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep}
    t = train_settings({"model": model, "system": system, "data": {"data_path": "-"}})
    stage = gpt_model(t, padded_vocab_size(vocab, t.model.make_vocab_size_divisible_by, tp), transformer_config(t))
    record = {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "parameters": sum(p.numel() for p in stage.parameters()),
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
