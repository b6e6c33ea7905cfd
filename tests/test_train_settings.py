"""The typed settings of `flagscale train`: strict conversion and the checks no single field can make."""

from __future__ import annotations

import pytest

from flagscale.errors import ConfigError
from flagscale.train.settings import experiment_settings, train_settings
from flagscale.train.tokenizer import ByteTokenizer, padded_vocab_size

DATA = {"data_path": "/data/corpus"}


def task(**model) -> dict:
    return {"model": model, "data": DATA}


def test_defaults_and_nested_values():
    t = train_settings(
        {
            "system": {"tensor_model_parallel_size": 2, "checkpoint": {"save": "/ckpt"}},
            "model": {"optimizer": {"lr": 1, "decay_style": "linear"}},
            "data": DATA,
        }
    )
    assert t.system.tensor_model_parallel_size == 2 and t.system.pipeline_model_parallel_size == 1
    assert t.model.optimizer.lr == 1.0 and isinstance(t.model.optimizer.lr, float)
    assert t.system.checkpoint.save == "/ckpt" and t.system.checkpoint.load is None


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"layers": 2}, "data": DATA}, r"train.model.layers: unknown key \(did you mean 'num_layers'\?\)"),
        ({"model": {"num_layers": 2.5}, "data": DATA}, "train.model.num_layers=2.5: expected an integer"),
        ({"model": {"num_layers": True}, "data": DATA}, "expected an integer"),
        ({"model": {"num_layers": 0}, "data": DATA}, "train.model.num_layers=0: must be at least 1"),
        ({"model": {"optimizer": "adam"}, "data": DATA}, "train.model.optimizer: expected a mapping"),
        ({"model": {"optimizer": {"name": "adamw"}}, "data": DATA}, r"use one of adam, sgd \(did you mean 'adam'\?\)"),
        ({"system": {"precision": "fp8"}, "data": DATA}, "use one of fp32, bf16, fp16"),
        ({"model": {"optimizer": {"lr": 0.001, "min_lr": 0.01}}, "data": DATA}, "min_lr"),
        ({"data": {}}, "train.data.data_path is not set"),
        ({"data": {**DATA, "split": "90,10"}}, "three comma-separated weights"),
        ({"data": {**DATA, "tokenizer": {"type": "hf"}}}, "needs a local tokenizer folder"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        train_settings(data)


@pytest.mark.parametrize(
    "model, system, world, message",
    [
        (
            {},
            {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
            2,
            "does not divide the world size 2",
        ),
        (
            {"global_batch_size": 6, "micro_batch_size": 2},
            {},
            2,
            "not a multiple of micro_batch_size=2 x data-parallel size 2",
        ),
        ({"num_attention_heads": 3, "hidden_size": 96}, {"tensor_model_parallel_size": 2}, 2, "num_attention_heads=3"),
        ({"hidden_size": 66}, {}, 1, "hidden_size=66 is not a multiple of num_attention_heads=4"),
        ({"num_layers": 3}, {"pipeline_model_parallel_size": 2}, 2, "num_layers=3 is not a multiple"),
        ({"seq_length": 64, "max_position_embeddings": 32}, {}, 1, "below seq_length=64"),
    ],
)
def test_layouts_that_cannot_run(model, system, world, message):
    t = train_settings({"model": model, "system": system, "data": DATA})
    with pytest.raises(ConfigError, match=message):
        t.check(world)


def test_a_layout_that_fits():
    train_settings(
        {
            "system": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
            "model": {"global_batch_size": 8, "micro_batch_size": 2},
            "data": DATA,
        }
    ).check(8)


@pytest.mark.parametrize(
    "experiment, message",
    [
        ({"task": {"type": "serve"}}, "flagscale train runs train tasks only"),
        ({"task": {"backend": "vllm"}}, "experiment.task.backend=vllm: use one of megatron"),
        ({"runner": {"nnodes": 2}}, "needs experiment.runner.hostfile"),
        ({"runner": {"ssh_port": 70000}}, "not a TCP port"),
        ({"envs": {"BAD-NAME": "1"}}, "not an environment variable name"),
        ({"envs": {"OK": {"nested": 1}}}, "expected a plain value"),
        ({"node_envs": {"host-a": "X=1"}}, "expected a mapping of VARIABLE: value"),
        ({"exp_name": "a/b"}, "must be a plain, non-empty name"),
    ],
)
def test_bad_experiments(experiment, message):
    with pytest.raises(ConfigError, match=message):
        experiment_settings(experiment)


def test_byte_tokenizer_and_vocab_padding():
    tok = ByteTokenizer()
    assert tok.tokenize("hé") == [104, 195, 169] and tok.detokenize([104, 195, 169, tok.eod]) == "hé"
    assert padded_vocab_size(257, 64, 1) == 320 and padded_vocab_size(257, 64, 2) == 384
    assert padded_vocab_size(257, 130, 1) == padded_vocab_size(257, 130, 2) == 260


# ------------------------------------------------------------- memory/speed knobs of train.system
MOE = {"family": "mixtral", "num_query_groups": 2, "moe": {"num_experts": 4}}


@pytest.mark.parametrize(
    "model, system, world, message",
    [
        ({}, {"context_parallel_size": 2}, 2, r"context_parallel_size=2: only 1 is supported \(megatron's context"),
        (
            {"num_layers": 4},
            {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
            2,
            "the interleaved pipeline schedule is not supported yet",
        ),
        ({"num_layers": 2}, {"virtual_pipeline_model_parallel_size": 2}, 1, "needs pipeline_model_parallel_size > 1"),
        ({}, {"sequence_parallel": True}, 1, "sequence_parallel=true needs tensor_model_parallel_size > 1"),
        (
            MOE,
            {"sequence_parallel": False, "tensor_model_parallel_size": 2},
            2,
            "megatron trains MoE with tensor parallelism only with sequence parallelism",
        ),
        (
            {},
            {"use_distributed_optimizer": True, "checkpoint": {"save": "/ckpt"}},
            2,
            "cannot save or resume optimizer checkpoints on this build yet",
        ),
        ({}, {"recompute_granularity": "full"}, 1, "recompute_granularity=full needs recompute_method"),
        ({}, {"recompute_method": "block"}, 1, r"need recompute_granularity=full \(it is null"),
        (
            {},
            {"recompute_granularity": "selective", "recompute_num_layers": 1},
            1,
            "need recompute_granularity=full",
        ),
        (
            {"num_layers": 4},
            {
                "recompute_granularity": "full",
                "recompute_method": "block",
                "recompute_num_layers": 3,
                "pipeline_model_parallel_size": 2,
            },
            2,
            "recompute_num_layers=3 exceeds the 2 layer",
        ),
    ],
)
def test_knobs_that_cannot_run(model, system, world, message):
    t = train_settings({"model": model, "system": system, "data": DATA})
    with pytest.raises(ConfigError, match=message):
        t.check(world)


def test_knob_defaults_resolve_as_megatron_needs():
    def t(model=None, **system):
        return train_settings({"model": model or {}, "system": system, "data": DATA})

    assert t().sequence_parallel is False and t(tensor_model_parallel_size=2).sequence_parallel is False
    assert t(MOE, tensor_model_parallel_size=2).sequence_parallel is True  # None: what MoE with TP needs
    assert t(tensor_model_parallel_size=2, sequence_parallel=True).sequence_parallel is True
    full = {"recompute_granularity": "full"}
    assert t({"num_layers": 4}, **full, recompute_method="uniform").recompute_layers == 1
    assert t({"num_layers": 4}, **full, recompute_method="block", pipeline_model_parallel_size=2).recompute_layers == 2
    assert t(**full, recompute_method="block", recompute_num_layers=1).recompute_layers == 1
    assert t(recompute_granularity="selective").recompute_layers is None
    ok = t(
        {"num_layers": 4},
        use_distributed_optimizer=True,
        virtual_pipeline_model_parallel_size=1,
        pipeline_model_parallel_size=2,
        **full,
        recompute_method="uniform",
    )
    ok.check(4)
