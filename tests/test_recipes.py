"""The model-family recipes in examples/<family>/conf: the real sizes users run, at a stated GPU count, and a tiny
variant of each that trains on the CPU through the same code path.

Without megatron: every recipe composes and validates (settings, layout for its world size) and its parameter
count is the published size. Integration (the patched wheel's venv, tests/megatron_env.py): every recipe's
`action=dryrun` runs cleanly with the data and tokenizer paths pointed at local stand-ins (multi-node recipes get a
hostfile: a dry run starts nothing), and the tiny llama3 and deepseek_v3 recipes train for real.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT

from flagscale.runner.config import compose
from flagscale.train.settings import experiment_settings, to_plain, train_settings
from flagscale.train.shapes import total_parameters

REAL = {  # recipe: published parameter count (the router's expert bias is a buffer in megatron.core)
    ("llama3", "8b"): 8_030_261_248,
    ("llama3", "70b"): 70_553_706_496,
    ("qwen3", "8b"): 8_190_735_360,
    ("qwen3", "30b_a3b"): 30_532_122_624,
    ("mixtral", "8x7b"): 46_702_792_704,
    ("deepseek_v3", "16b_a3b"): 15_960_108_544,
}
TINY = [("llama3", "tiny"), ("qwen3", "tiny"), ("qwen3", "tiny_moe"), ("mixtral", "tiny"), ("deepseek_v3", "tiny")]
ALL = [*REAL, *TINY]


def recipe(family: str, name: str, *overrides: str):
    cfg = to_plain(compose(REPO_ROOT / "examples" / family / "conf", name, list(overrides)))
    return train_settings(cfg["train"]), experiment_settings(cfg["experiment"])


def test_every_recipe_is_tested():
    """Every training recipe of a model family (the examples with a conf/train folder; tiny_gpt has its own tests)."""
    recipes = [p for p in REPO_ROOT.glob("examples/*/conf/*.yaml") if (p.parent / "train").is_dir()]
    found = {(p.parent.parent.name, p.stem) for p in recipes}
    assert {f for f in found if f[0] != "tiny_gpt"} == set(ALL)


@pytest.mark.parametrize("family, name", ALL, ids=lambda v: v)
def test_recipe_validates_for_its_world_size(family, name):
    train, exp = recipe(family, name)
    assert train.model.family.startswith(family.removesuffix("3") if family == "llama3" else family)
    train.check(exp.runner.nnodes * exp.runner.nproc_per_node)
    assert (exp.runner.device == "cpu") is (name.startswith("tiny"))


@pytest.mark.parametrize("family, name", list(REAL), ids=lambda v: v)
def test_real_recipe_has_the_published_size(family, name):
    train, _ = recipe(family, name)
    assert total_parameters(train.model, train.model.vocab_size) == REAL[family, name]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(venv):
    return venv.corpus()


@pytest.mark.integration
@pytest.mark.parametrize("family, name", ALL, ids=lambda v: v)
def test_recipe_dryrun(venv, corpus, tmp_path, family, name):
    _, exp = recipe(family, name)
    hosts = tmp_path / "hostfile"
    hosts.write_text("".join(f"node{i} slots={exp.runner.nproc_per_node}\n" for i in range(exp.runner.nnodes)))
    (tmp_path / "tokenizer").mkdir()
    result = venv.run(
        [
            venv.flagscale,
            "train",
            REPO_ROOT / "examples" / family / "conf",
            "--config-name",
            name,
            "action=dryrun",
            f"experiment.exp_dir={tmp_path / 'exp'}",
            f"train.data.data_path={corpus}",
            *([f"train.data.tokenizer.path={tmp_path / 'tokenizer'}"] if not name.startswith("tiny") else []),
            *([f"experiment.runner.hostfile={hosts}"] if exp.runner.nnodes > 1 else []),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"world size {exp.runner.nnodes * exp.runner.nproc_per_node}" in result.stdout
    assert "# parameters per rank" in result.stdout and "the whole model" in result.stdout
    assert not (tmp_path / "exp").exists(), "a dry run wrote files"


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama3", "deepseek_v3"])
def test_tiny_recipe_trains_on_the_cpu(venv, corpus, tmp_path, family):
    exp = tmp_path / "exp"
    result = venv.run(
        [
            venv.flagscale,
            "train",
            REPO_ROOT / "examples" / family / "conf",
            "--config-name",
            "tiny",
            "--foreground",
            f"experiment.exp_dir={exp}",
            f"train.data.data_path={corpus}",
        ],
        timeout=600,
        label=f"recipe-{family}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    curve = [json.loads(line)["loss"] for line in (exp / "logs" / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{family} tiny recipe: loss {curve[0]:.3f} -> {curve[-1]:.3f} ({venv.timings[f'recipe-{family}']} s)")
    assert len(curve) == 20 and curve[-1] < 0.7 * curve[0], curve
