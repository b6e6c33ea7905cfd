"""The memory model (flagscale/train/memory.py): its arithmetic, and (integration) its parameters, gradient buffers
and optimizer states equal, byte for byte, what `flagscale train` allocated on every rank (the driver's
<exp_dir>/logs/memory/rank<R>.json), with the total within a stated tolerance of the measured peak."""

from __future__ import annotations

import json

import pytest
from test_shapes import LLAMA3_8B, MIXTRAL_8X7B

from flagscale.train.memory import estimate
from flagscale.train.settings import train_settings
from flagscale.train.shapes import Tensor, stage_parameters


def settings(model: dict, **system):
    return train_settings({"model": model, "system": system, "data": {"data_path": "-"}})


def test_parameters_are_the_shapes_in_the_precision():
    t = settings(LLAMA3_8B, tensor_model_parallel_size=8, pipeline_model_parallel_size=4, precision="bf16")
    ranks = estimate(t, 64, 128256)
    stages = stage_parameters(t.model, 128256, 8, 4)
    assert len(ranks) == 64 and [r.rank for r in ranks] == list(range(64))
    for r in ranks:
        assert r.stage == r.rank // 16 and r.tp_rank == r.rank % 8 and r.dp_rank == (r.rank // 8) % 2
        n = stages[r.stage].total
        # bf16 weights, fp32 gradient buffers, Adam's two states and the fp32 main weights
        assert (r.parameters, r.gradients, r.optimizer) == (2 * n, 4 * n, 12 * n)


def test_distributed_optimizer_shards_states_over_dp_with_megatrons_padding():
    model = {"family": "llama", "num_layers": 2, "hidden_size": 72, "num_attention_heads": 4, "ffn_hidden_size": 100}
    plain = estimate(settings(model), 4, 257)
    dist = estimate(settings(model, use_distributed_optimizer=True), 4, 257)
    n = stage_parameters(settings(model).model, 257, 1, 1)[0].total
    assert {r.optimizer for r in plain} == {8 * n}
    # every parameter starts at a multiple of 64 elements and the bucket ends at a multiple of lcm(DP, 128): the
    # buffers grow, and the DP shards cover every parameter element exactly once
    assert dist[0].gradients > plain[0].gradients and dist[0].gradients % (128 * 4) == 0  # lcm(4, 128) fp32 elements
    assert sum(r.optimizer for r in dist) == 8 * n
    assert max(r.optimizer for r in dist) <= 8 * dist[0].gradients // 4 // 4


def test_ddp_buffer_layout_by_hand():
    from flagscale.train.memory import ddp_buffer

    # reversed: 10 elements at 0, 100 at 64, 5 at 192 -> 197, padded to 256 = 2 shards of 128
    b = ddp_buffer([Tensor(5), Tensor(100), Tensor(10)], 2, True)
    assert b.numel == 256 and b.shard_elements == (10 + 64, 36 + 5)
    assert ddp_buffer([Tensor(5), Tensor(100)], 2, False).numel == 105


def test_recompute_sequence_parallel_and_pipeline_lower_activations():
    model = {**LLAMA3_8B, "num_layers": 8, "seq_length": 4096, "global_batch_size": 16}

    def act(world=8, **system):
        return estimate(settings(model, **system), world, 128256)[0].activations

    none = act(tensor_model_parallel_size=8)
    selective = act(tensor_model_parallel_size=8, recompute_granularity="selective")
    full = act(tensor_model_parallel_size=8, recompute_granularity="full", recompute_method="uniform")
    sp = act(tensor_model_parallel_size=8, sequence_parallel=True)
    assert full < selective < none and sp < none
    pp = estimate(settings(model, pipeline_model_parallel_size=4, tensor_model_parallel_size=2), 8, 128256)
    # 1F1B: the first stage holds 4 micro-batches in flight, the last one (plus the logits)
    assert pp[0].activations > pp[-1].activations


def test_moe_expert_parallelism_splits_expert_states():
    t1 = estimate(settings(MIXTRAL_8X7B, pipeline_model_parallel_size=4), 8, 32000)
    t2 = estimate(settings(MIXTRAL_8X7B, pipeline_model_parallel_size=4, expert_model_parallel_size=2), 8, 32000)
    assert t2[0].parameters < t1[0].parameters and t2[0].optimizer < t1[0].optimizer


def test_dryrun_prints_memory_per_distinct_rank():
    from flagscale.train.launcher import memory_lines

    t = settings({**LLAMA3_8B, "vocab_size": 128256}, tensor_model_parallel_size=8, pipeline_model_parallel_size=4)
    lines = memory_lines(t, 64)
    assert lines[0].startswith("memory per rank (GiB;") and len(lines) == 1 + 4  # one line per stage: 16 ranks alike
    assert lines[1].startswith("  stage 0, ranks 0..15 (16): ")
    hf = train_settings({"data": {"data_path": "-", "tokenizer": {"type": "hf", "path": "/tok"}}})
    assert "set train.model.vocab_size" in memory_lines(hf, 1)[0]


# ------------------------------------------------------------------------------------------ integration
@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


# Odd sizes (head dim 18, ffn 100) so the distributed optimizer's 64-element alignment pads the buffers.
ODD_LLAMA = {"family": "llama", "hidden_size": 72, "num_query_groups": 2, "ffn_hidden_size": 100}
LAYOUTS = {
    "dp2-distopt-full-recompute": (
        {"use_distributed_optimizer": "true", "recompute_granularity": "full", "recompute_method": "block"},
        ODD_LLAMA,
    ),
    "tp2-sp-selective-bf16": (
        {
            "tensor_model_parallel_size": 2,
            "sequence_parallel": "true",
            "recompute_granularity": "selective",
            "precision": "bf16",
        },
        {"family": "llama", "num_query_groups": 2, "ffn_hidden_size": 128},
    ),
}
# The measured peak (resident high-water mark less the resident memory before the model) of these tiny models is
# mostly the fixed runtime overhead; the model's total stays within 40% of it (the 125M models of
# benchmarks/bench_memory.py: within 15%).
TOTAL_RTOL = 0.4


@pytest.mark.integration
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_state_bytes_equal_what_the_driver_allocated(venv, name):
    from conftest import REPO_ROOT

    system, model = LAYOUTS[name]
    exp = venv.work / f"memory-{name}"
    result = venv.run(
        [
            venv.flagscale,
            "train",
            REPO_ROOT / "examples/tiny_gpt/conf",
            "--config-name",
            "dp2",
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"train.data.data_path={venv.corpus()}",
            "train.system.checkpoint.save=null",
            "++train.model.train_iters=3",
            *(f"++train.model.{k}={v}" for k, v in model.items()),
            *(f"++train.system.{k}={v}" for k, v in system.items()),
        ],
        timeout=300,
        label=name,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads((exp / "config" / "train.json").read_text())
    t = train_settings(payload["train"])
    predicted = estimate(t, 2, 257)
    measured = sorted(
        (json.loads(p.read_text()) for p in (exp / "logs" / "memory").glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert len(measured) == 2
    for p, r in zip(predicted, measured, strict=True):
        assert (p.stage, p.tp_rank, p.dp_rank) == (r["stage"], r["tp_rank"], r["dp_rank"])
        assert (p.parameters, p.gradients, p.optimizer) == (r["parameters"], r["gradients"], r["optimizer"]), r
        assert r["iteration"] == 3 and r["peak"] > 0
        print(
            f"\n{name} rank {p.rank}: predicted total {p.total / 2**20:.1f} MiB, measured peak {r['peak'] / 2**20:.1f}"
        )
        assert abs(p.total - r["peak"]) <= TOTAL_RTOL * r["peak"], (p, r)
