"""Heterogeneous training (`train.system.hetero`, flagscale/train/hetero.py): meshes with their own TP/DP/PP.

Without megatron: the settings, every validation rule (one line naming the mesh and the rule, before launch), the
dry run (every mesh, its ranks and layout; each node's own device environment from its mesh's manifest) and the
re-slicing of pipeline micro-batches at a border. With the patched megatron-core (integration, the venv of
tests/megatron_env.py, world size 4 over gloo): the tiny llama with mesh A (TP=2, DP=1) and mesh B (TP=1, DP=2), on
two "nodes" of two device types with their own environments, gives the losses of the homogeneous PP=2 run, iteration
by iteration within 1e-5, and resumes from its checkpoint exactly; likewise meshes differing in DP only with an
uneven layer split (against the same split on megatron's own path).
"""

from __future__ import annotations

import io
import json

import pytest

from flagscale.errors import ConfigError
from flagscale.train import hetero
from flagscale.train.settings import train_settings

LLAMA = {
    "family": "llama",
    "num_layers": 4,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
    "seq_length": 32,
    "vocab_size": 384,  # one padded vocabulary for TP 1 and 2 (the padded logits are part of the loss)
    "micro_batch_size": 2,
    "global_batch_size": 12,
}
A = {"device_type": "A", "tensor_model_parallel_size": 2, "data_parallel_size": 1, "micro_batch_size": 2}
B = {"device_type": "B", "tensor_model_parallel_size": 1, "data_parallel_size": 2, "micro_batch_size": 1}


def settings(meshes=(A, B), model=None, **system):
    hetero_settings = {"meshes": list(meshes), **system.pop("hetero", {})}
    return train_settings(
        {
            "model": {**LLAMA, **(model or {})},
            "system": {"hetero": hetero_settings, **system},
            "data": {"data_path": "/data/corpus"},
        }
    )


# ------------------------------------------------------------------------------------------ settings
def test_meshes_parse_into_frozen_settings_in_pipeline_order():
    t = settings()
    h = t.system.hetero
    assert isinstance(h, hetero.HeteroSettings) and h.cross_mesh == "gloo" and h.layer_split is None
    assert [(m.device_type, m.tensor_model_parallel_size, m.data_parallel_size) for m in h.meshes] == [
        ("A", 2, 1),
        ("B", 1, 2),
    ]
    lay = hetero.train_layout(t)
    assert [list(m.ranks) for m in lay.meshes] == [[0, 1], [2, 3]]
    assert lay.split == (2, 2) and lay.samples_per_microbatch == 2 and not lay.uniform
    alike = {**A, "device_type": None}
    assert hetero.train_layout(settings((alike, alike))).uniform  # megatron's own groups and p2p
    assert not hetero.train_layout(settings(({**alike, "device": "cpu"}, alike))).uniform  # other chips: gloo borders
    assert lay.meshes[1].coordinates(3) == (1, 1, 0)  # stage 1, DP rank 1, TP rank 0
    assert hetero.padding_tp(t) == 2
    t.check(4)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"meshes": [{**A, "tensor_model_paralel_size": 2}]}, "did you mean 'tensor_model_parallel_size'"),
        ({"meshes": []}, "list at least one mesh"),
        ({"meshes": [A], "layer_split": [2, 0]}, "every stage needs at least one layer"),
        ({"meshes": [A], "cross_mesh": "nccl"}, "use one of gloo"),
    ],
)
def test_bad_hetero_settings_name_the_key(value, message):
    with pytest.raises(ConfigError, match="train.system.hetero") as err:
        train_settings({"model": LLAMA, "system": {"hetero": value}, "data": {"data_path": "-"}})
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------- rules
TP3 = {**A, "tensor_model_parallel_size": 3}
RULES = [
    ((A, B), {}, {}, 8, r"meshes hold 2x1x1 \+ 1x2x1 = 4 ranks .* but the job has 8"),
    ((TP3, B), {}, {}, 5, r"meshes\[0\] \(type A\): model.num_attention_heads=4 is not a multiple of its tensor_"),
    ((A, B), {"num_query_groups": 1}, {}, 4, r"meshes\[0\] \(type A\): model.num_query_groups=1 is not a multiple"),
    ((A, {**B, "micro_batch_size": 2}), {}, {}, 4, r"meshes\[1\] \(type B\): data_parallel_size x micro_batch_size"),
    ((A, B), {"global_batch_size": 5}, {}, 4, r"meshes\[0\] \(type A\): model.global_batch_size=5 is not a multiple"),
    ((A, B), {"num_layers": 3}, {}, 4, r"layer_split: model.num_layers=3 does not split evenly over the 2"),
    ((A, B), {}, {"hetero": {"layer_split": [1, 2, 1]}}, 4, r"layer_split=\[1, 2, 1\]: 3 stage\(s\), but the meshes"),
    ((A, B), {}, {"hetero": {"layer_split": [1, 2]}}, 4, r"layer_split=\[1, 2\] sums to 3, not model.num_layers=4"),
    ((A, B), {"share_embeddings_and_output_weights": True}, {}, 4, r"tied embeddings .* first and last mesh"),
    ((A, B), {}, {"tensor_model_parallel_size": 2}, 4, r"tensor_model_parallel_size=2: with system.hetero the meshes"),
    ((A, B), {}, {"sequence_parallel": True}, 4, r"system.sequence_parallel: not supported with system.hetero yet"),
    ((A, B), {}, {"use_distributed_optimizer": True}, 4, r"use_distributed_optimizer: not supported"),
    ((A, B), {}, {"checkpoint": {"hf_model": "/hf/llama"}}, 4, r"checkpoint.hf_model: not supported"),
]


@pytest.mark.parametrize("meshes, model, system, world, message", RULES)
def test_every_rule_is_refused_before_launch_naming_the_mesh(meshes, model, system, world, message):
    with pytest.raises(ConfigError, match=message) as err:
        settings(meshes, model, **system).check(world)
    assert "\n" not in str(err.value)


def test_an_even_split_and_an_uneven_one():
    assert hetero.train_layout(settings()).megatron_layout() == [
        ["embedding", "decoder", "decoder"],
        ["decoder", "decoder", "loss"],
    ]
    t = settings(hetero={"layer_split": [1, 3]})
    t.check(4)
    assert hetero.train_layout(t).megatron_layout() == [["embedding", "decoder"], ["decoder"] * 3 + ["loss"]]


# -------------------------------------------------------------------------------------- the borders
def _communicator(t, rank):
    from types import SimpleNamespace

    lay = hetero.train_layout(t)
    mesh = lay.mesh_of_rank(rank)
    stage, dp_rank, tp_rank = mesh.coordinates(rank)
    rt = hetero.Runtime(lay, rank, mesh, stage, dp_rank, tp_rank)
    return hetero.Communicator(rt, SimpleNamespace(pipeline_dtype=None))


@pytest.mark.parametrize(
    "meshes",
    [
        (A, B),
        ({**A, "tensor_model_parallel_size": 1, "micro_batch_size": 3}, {**B, "data_parallel_size": 3}),
        ({**B, "data_parallel_size": 3, "micro_batch_size": 2}, {**A, "data_parallel_size": 2, "micro_batch_size": 3}),
    ],
)
def test_every_sample_of_a_micro_batch_crosses_a_border_once_to_every_tp_rank(meshes):
    """Forward: what each sender sends is what each receiver expects (same peers, same sample counts), and every
    receiver gets each of its samples exactly once; the backward is the mirror image."""
    model = {"global_batch_size": 12}
    t = settings(meshes, model)
    lay = hetero.train_layout(t)
    first, second = lay.meshes
    sent, expected = [], []
    for rank in first.ranks:
        c = _communicator(t, rank)
        sent += [(rank, peer, hi - lo) for peer, lo, hi in c._pieces(first, 0, second, 1, sending=True)]
    for rank in second.ranks:
        c = _communicator(t, rank)
        pieces = c._pieces(second, 1, first, 0, sending=False)
        assert sum(hi - lo for _, lo, hi in pieces) == second.mbs  # all of its samples
        assert [lo for _, lo, _ in pieces] == sorted(lo for _, lo, _ in pieces)  # in order: concatenated as is
        expected += [(peer, rank, hi - lo) for peer, lo, hi in pieces]
    assert sorted(sent) == sorted(expected)
    assert _communicator(t, first.first_rank)._grad_scale() == first.dp / second.dp


def test_a_checkpoint_of_the_other_kind_is_refused_in_one_line(monkeypatch):
    saved_hetero = {"hetero": "mesh 0 TP=2 DP=1 PP=1, mesh 1 TP=1 DP=2 PP=1", "world": 4}
    saved_plain = {"TP": 2, "PP": 2, "DP": 1}
    hetero.check_checkpoint(saved_plain, "/ckpt")  # meshes all alike: megatron's layout, stacked layers
    with pytest.raises(ConfigError, match="saved by a hetero run with meshes of different layouts"):
        hetero.check_checkpoint(saved_hetero, "/ckpt")
    monkeypatch.setattr(hetero, "_ACTIVE", _communicator(settings(), 0).rt)  # this run's meshes differ
    hetero.check_checkpoint(saved_hetero, "/ckpt")
    with pytest.raises(ConfigError, match="/ckpt has stacked layers"):
        hetero.check_checkpoint(saved_plain, "/ckpt")


# ------------------------------------------------------------------------------ dry run and devices
def _plan(tmp_path, meshes=(A, B), hostfile: str | None = None, **experiment):
    from flagscale.train import launcher

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for suffix in (".bin", ".idx"):
        (data / f"corpus{suffix}").write_bytes(b"")
    runner = {"nproc_per_node": 4, "python": "/usr/bin/python3", "master_port": 29511, **experiment.pop("runner", {})}
    if hostfile is not None:
        (tmp_path / "hosts").write_text(hostfile)
        runner.update(hostfile=str(tmp_path / "hosts"), nnodes=len(hostfile.splitlines()))
    plain = {
        "experiment": {"exp_name": "hetero", "exp_dir": str(tmp_path / "exp"), "runner": runner, **experiment},
        "train": {
            "model": LLAMA,
            "system": {"hetero": {"meshes": list(meshes)}},
            "data": {"data_path": str(data / "corpus")},
        },
    }
    return launcher, launcher.plan(plain)


def test_dryrun_shows_every_mesh_its_ranks_and_layout(tmp_path):
    local = [{k: v for k, v in m.items() if k != "device_type"} for m in (A, B)]
    launcher, p = _plan(tmp_path, local)
    out = io.StringIO()
    launcher.dryrun(p, out)
    text = out.getvalue()
    assert (
        "# hetero: 2 mesh(es), 2 pipeline stage(s), 2 sample(s) per pipeline micro-batch, cross-mesh path gloo" in text
    )
    assert "#   mesh 0: ranks 0..1, TP=2 DP=1 PP=1, micro-batch 2, device the job device; stage 0: layers 0..1" in text
    assert "#   mesh 1: ranks 2..3, TP=1 DP=2 PP=1, micro-batch 1, device the job device; stage 1: layers 2..3" in text
    assert not (tmp_path / "exp").exists()


def test_dryrun_counts_the_parameters_of_every_stage_as_its_mesh_splits_them(tmp_path):
    """Meshes all at TP=2 count what the homogeneous TP=2 PP=2 count does (flagscale.train.shapes, checked against
    megatron's build in tests/test_shapes.py); mesh B at TP=1 holds twice the per-rank layer and output parameters."""
    from flagscale.train.shapes import layer_parameters, stage_parameters

    alike = {**A, "device_type": None}
    same = hetero.parameter_lines(settings((alike, alike)), 384)
    for stage in stage_parameters(settings((alike, alike)).model, 384, 2, 2):
        assert f"  stage {stage.stage}: {stage.total:,} on each of its 2 TP rank(s)" in "\n".join(same)
    lines = hetero.parameter_lines(settings(), 384)
    m = settings().model
    head = 64 + 384 * 64  # the final RMSNorm, the whole output layer on TP=1
    assert lines[2] == (
        f"  stage 1: {2 * layer_parameters(m, 1) + head:,} on each of its 1 TP rank(s) = embedding 0 + 2 layer(s) x "
        f"{layer_parameters(m, 1):,} + final norm and output layer {head:,}"
    )


@pytest.fixture
def two_cpu_devices(tmp_path, monkeypatch):
    """A FlagScale project with two test devices that both run on the CPU, each with its own visible-devices
    variable (hardware/cpua, hardware/cpub)."""
    from conftest import REPO_ROOT

    root = tmp_path / "project"
    root.mkdir()
    (root / "third_party").symlink_to(REPO_ROOT / "third_party", target_is_directory=True)
    for name in ("cpua", "cpub"):
        folder = root / "hardware" / name
        folder.mkdir(parents=True)
        (folder / "device.toml").write_text(
            f'[device]\nname = "{name}"\nvendor = "test"\nbackends = ["megatron"]\ntorch_device = "cpu"\n'
            f'collective = "gloo"\nvisible_devices_env = "{name.upper()}_VISIBLE_DEVICES"\n'
        )
    monkeypatch.setenv("FLAGSCALE_ROOT", str(root))
    return root


def test_two_device_types_map_to_their_meshes_with_their_own_environment(tmp_path, two_cpu_devices):
    meshes = ({**A, "device_type": "typea", "device": "cpua"}, {**B, "device_type": "typeb", "device": "cpub"})
    launcher, p = _plan(
        tmp_path,
        meshes,
        hostfile="node-a slots=2 type=typea\nnode-b slots=2 type=typeb\n",
        runner={"nproc_per_node": 2, "device": "cpua", "visible_devices": "0,1", "rdzv_backend": "static"},
        device_type_envs={"typea": {"MESH_NAME": "A"}, "typeb": {"MESH_NAME": "B"}},
    )
    first, second = (node.script_text for node in p.nodes)
    assert "export CPUA_VISIBLE_DEVICES=0,1" in first and "export MESH_NAME=A" in first
    assert "export CPUB_VISIBLE_DEVICES=0,1" in second and "export MESH_NAME=B" in second
    assert "CPUA_VISIBLE_DEVICES" not in second and "export MEGATRON_DEVICE_TYPE=cpu" in second
    out = io.StringIO()
    launcher.dryrun(p, out)
    assert "mesh 1 (typeb): ranks 2..3, TP=1 DP=2 PP=1, micro-batch 1, device cpub" in out.getvalue()


@pytest.mark.parametrize(
    "hostfile, nproc, message",
    [
        (
            "node-b slots=2 type=B\nnode-a slots=2 type=A\n",
            2,
            r"meshes\[0\] \(type A\): needs 1 node\(s\) of type=A at hostfile positions 1..1 .* found node-b",
        ),
        (
            "node-a slots=4 type=A\n",
            4,
            r"meshes\[0\] \(type A\): its 2 ranks from rank 0 do not fill whole nodes",
        ),
    ],
)
def test_the_hostfile_types_must_match_the_meshes(tmp_path, hostfile, nproc, message):
    with pytest.raises(ConfigError, match=message):
        _plan(tmp_path, hostfile=hostfile, runner={"nproc_per_node": nproc, "rdzv_backend": "static"})


def test_device_types_on_several_nodes_need_the_static_rendezvous(tmp_path):
    with pytest.raises(ConfigError, match="rdzv_backend=c10d: meshes of device types need node ranks in hostfile"):
        _plan(tmp_path, hostfile="node-a slots=2 type=A\nnode-b slots=2 type=B\n", runner={"nproc_per_node": 2})


def test_device_types_need_a_hostfile(tmp_path):
    with pytest.raises(ConfigError, match="device_type names hostfile types"):
        _plan(tmp_path)


# ------------------------------------------------------------------------------------ the same math
@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


TRAIN = {**LLAMA, "train_iters": 20, "optimizer": {"lr": 0.003, "min_lr": 0.0003, "warmup_iters": 2}}


def _hydra(value) -> str:
    """A Python value as a Hydra override value (lists and dicts in Hydra's grammar)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _train(venv, name: str, system: dict, checkpoint: dict | None = None) -> list[float]:
    """`flagscale train` of the tiny llama on 4 local processes; the per-iteration losses."""
    from conftest import REPO_ROOT

    exp = venv.work / f"hetero-{name}"
    model = [f"++train.model.{k}={_hydra(v)}" for k, v in TRAIN.items()]
    result = venv.run(
        [
            venv.flagscale,
            "train",
            REPO_ROOT / "examples/tiny_gpt/conf",
            "--foreground",
            f"experiment.exp_dir={exp}",
            "experiment.runner.nproc_per_node=4",
            f"train.data.data_path={venv.corpus()}",
            *(f"++train.system.checkpoint.{k}={_hydra(v)}" for k, v in (checkpoint or {"save": None}).items()),
            *model,
            *(f"++train.system.{k}={_hydra(v)}" for k, v in system.items()),
        ],
        timeout=600,
        label=name,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]


def _same(reference: list[float], curve: list[float]) -> float:
    assert len(curve) == len(reference) == 20, (reference, curve)
    worst = max(abs(a - b) for a, b in zip(reference, curve, strict=True))
    assert worst <= 1e-5, (worst, reference, curve)
    return worst


def _local(*meshes) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "device_type"} for m in meshes]


def _two_nodes(venv, root, checkpoint: dict):
    """The ssh launcher's job for a hostfile of two device types, on two "nodes" of this machine (127.0.0.1 and
    localhost): launcher.plan and its files as action=run writes them, then each node's script as its node agent
    runs it, side by side. Node 0 (type typea, mesh A, device manifest cpua) and node 1 (typeb, mesh B, cpub)."""
    import subprocess

    from megatron_env import free_port, run_env

    from flagscale.train import launcher

    exp = venv.work / "hetero-two-nodes"
    (root / "hosts").write_text("127.0.0.1 slots=2 type=typea\nlocalhost slots=2 type=typeb\n")
    meshes = [{**A, "device_type": "typea", "device": "cpua"}, {**B, "device_type": "typeb", "device": "cpub"}]
    show = "env | grep -E '^(CPU._VISIBLE_DEVICES|MESH_NAME|MEGATRON_DEVICE_TYPE)=' | sort > env-$MESH_NAME.txt"
    plain = {
        "experiment": {
            "exp_name": "hetero-two-nodes",
            "exp_dir": str(exp),
            "runner": {
                "nnodes": 2,
                "nproc_per_node": 2,
                "hostfile": str(root / "hosts"),
                "python": str(venv.python),
                "master_port": free_port(),
                "rdzv_backend": "static",
                "device": "cpua",
                "visible_devices": "0,1",
            },
            "envs": {"OMP_NUM_THREADS": 1, "PYTHONWARNINGS": "ignore"},
            "device_type_envs": {"typea": {"MESH_NAME": "A"}, "typeb": {"MESH_NAME": "B"}},
            "cmds": {"before_start": show},
        },
        "train": {
            "model": TRAIN,
            "system": {"deterministic": True, "checkpoint": checkpoint, "hetero": {"meshes": meshes}},
            "data": {"data_path": str(venv.corpus())},
        },
    }
    p = launcher.plan(plain)
    launcher._write_files(p)
    nodes = [
        subprocess.Popen(["bash", str(n.script)], env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for n in p.nodes
    ]
    outputs = [node.communicate(timeout=600)[0].decode(errors="replace") for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return exp


@pytest.mark.integration
def test_meshes_of_other_tp_and_dp_and_devices_train_as_the_homogeneous_pipeline(venv, tmp_path, two_cpu_devices):
    """Mesh A (TP=2, DP=1, micro-batch 2) holds layers 0-1 on a node of type typea (device cpua), mesh B (TP=1, DP=2,
    micro-batch 1) layers 2-3 on a node of type typeb (device cpub), each node with its own device environment: the
    losses of TP=2 PP=2 on megatron's own path. Gradient clipping is active (norms above 1): the grad norm is summed
    across the meshes. The hetero run saves at iteration 10; resumed from there in the hetero layout, it repeats
    iterations 11-20 exactly."""
    import shutil

    reference = _train(venv, "reference", {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2})
    saved = venv.work / "hetero-checkpoints"
    exp = _two_nodes(venv, tmp_path, {"save": str(saved), "save_interval": 10})
    curve = [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    worst = _same(reference, curve)
    print(
        f"\nhetero TP2/DP1 | TP1/DP2 on two device types vs TP2 PP2: max |loss difference| {worst:.1e}, 20 iterations"
    )
    assert reference[-1] < 0.8 * reference[0]
    # every node ran its mesh's ranks with its own device manifest and type variables
    assert sorted(f.name for f in (exp / "logs" / "node0").glob("rank*.log")) == ["rank0.log", "rank1.log"]
    assert sorted(f.name for f in (exp / "logs" / "node1").glob("rank*.log")) == ["rank2.log", "rank3.log"]
    assert (exp / "env-A.txt").read_text() == "CPUA_VISIBLE_DEVICES=0,1\nMEGATRON_DEVICE_TYPE=cpu\nMESH_NAME=A\n"
    assert (exp / "env-B.txt").read_text() == "CPUB_VISIBLE_DEVICES=0,1\nMEGATRON_DEVICE_TYPE=cpu\nMESH_NAME=B\n"
    # the dry run's parameter counts are what every rank built (its memory record: fp32 bytes)
    lines = hetero.parameter_lines(settings(), 384)[1:]
    counts = [int(line.split(":")[1].split()[0].replace(",", "")) for line in lines]
    built = {
        int(f.stem[4:]): json.loads(f.read_text())["parameters"] // 4
        for f in (exp / "logs" / "memory").glob("rank*.json")
    }
    assert built == {0: counts[0], 1: counts[0], 2: counts[1], 3: counts[1]}, (built, counts)

    at_10 = venv.work / "hetero-at-10"  # the checkpoint of iteration 10 alone, as a run killed after it left it
    shutil.copytree(saved / "iter_0000010", at_10 / "iter_0000010")
    (at_10 / "latest_checkpointed_iteration.txt").write_text("10\n")
    system = {"hetero": {"meshes": _local(A, B)}}  # the same layout on one node
    resumed = _train(venv, "tp-dp-resumed", system, {"load": str(at_10), "save": None})
    assert resumed == curve[10:], (resumed, curve[10:])


@pytest.mark.integration
def test_meshes_of_other_dp_with_an_uneven_split_train_as_megatron_does(venv):
    """Mesh A (TP=1, DP=1, micro-batch 3) holds layer 0, mesh B (TP=1, DP=3, micro-batch 1) layers 1-3, against the
    same split on megatron's own path (two alike meshes: its groups, p2p and pipeline layout)."""
    split = {"layer_split": [1, 3]}
    alike = {**A, "micro_batch_size": 2}
    reference = _train(venv, "uneven-reference", {"hetero": {"meshes": _local(alike, alike), **split}})
    dp_only = (
        {**A, "tensor_model_parallel_size": 1, "micro_batch_size": 3},
        {**B, "data_parallel_size": 3, "micro_batch_size": 1},
    )
    curve = _train(venv, "dp-uneven", {"hetero": {"meshes": _local(*dp_only), **split}})
    worst = _same(reference, curve)
    print(f"\nhetero DP1 | DP3, layers 1 + 3 vs megatron's PP=2 with that split: max difference {worst:.1e}")
