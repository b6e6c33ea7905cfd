"""The training tuner (flagscale.tune, `flagscale train CONF action=auto_tune`).

Fast: the space enumerated and checked by the train task's own rules, dominance, the bad inputs (one line each,
nothing launched), the history's bookkeeping. Integration: a real tiny tuner run at world size 2, SIGKILLed during
a trial and restarted: no finished trial runs twice and the history ends as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from flagscale import train
from flagscale.errors import ConfigError
from flagscale.runner.config import compose
from flagscale.train.settings import to_plain, train_settings
from flagscale.tune.history import History
from flagscale.tune.settings import TrainSpace, train_tuner_settings
from flagscale.tune.space import cost, enumerate_space
from flagscale.tune.train import Search, best_config

LLAMA3 = REPO_ROOT / "examples" / "llama3" / "conf"
TINY_SPACE = "{tp: [1, 2], pp: [1, 2], micro_batch_size: [1, 2, 4]}"


def tiny(tmp_path: Path, *overrides: str):
    """examples/llama3 tiny (4 heads, 2 query groups, 2 layers, global batch 8) at world size 4."""
    return compose(
        LLAMA3,
        "tiny",
        [f"experiment.exp_dir={tmp_path}", "experiment.runner.nproc_per_node=4", "action=auto_tune", *overrides],
    )


def space(**dims) -> TrainSpace:
    return train_tuner_settings({"space": dims}).space


def tiny_train():
    return train_settings(to_plain(compose(LLAMA3, "tiny"))["train"])


def test_the_space_is_checked_by_the_train_tasks_own_rules():
    valid, rejected = enumerate_space(space(tp=[1, 2], pp=[1, 2], micro_batch_size=[1, 2, 4]), tiny_train(), 4, 4)
    # dp = 4/(tp*pp); micro_batch_size x dp must divide the global batch 8
    assert len(valid) == 11 and {c.layout[:3] for c in valid} == {(1, 1, 4), (2, 1, 2), (1, 2, 2), (2, 2, 1)}
    (bad,) = rejected
    assert (bad.candidate.tp, bad.candidate.pp, bad.candidate.micro_batch_size) == (1, 1, 4)
    assert "global_batch_size=8 is not a multiple of micro_batch_size=4 x data-parallel size 4" in bad.reason
    # 4 query groups... no: 2 query groups, so TP=4 cannot split the key/value heads
    _, rejected = enumerate_space(space(tp=[4]), tiny_train(), 4, 4)
    assert "num_query_groups=2 is not a multiple of tensor_model_parallel_size=4" in rejected[0].reason


def test_auto_dimensions_and_knobs_that_mean_nothing_collapse():
    valid, _ = enumerate_space(
        space(tp="auto", sequence_parallel="auto", use_distributed_optimizer="auto"), tiny_train(), 4, 2
    )
    assert {c.tp for c in valid} == {1, 2}  # auto TP stays within a node (2 processes per node here)
    assert all(c.sequence_parallel is None for c in valid if c.tp == 1)  # one TP rank: nothing to split
    assert len({c.key for c in valid}) == len(valid)
    recompute, _ = enumerate_space(
        space(recompute_granularity=[None, "full"], recompute_method=["uniform", "block"]), tiny_train(), 4, 4
    )
    assert sorted(c.key.split("rc_")[1] for c in recompute) == ["full-block-all", "full-uniform-all", "none"]


def test_the_order_tries_each_layout_first_then_the_best_layouts_candidates():
    valid, _ = enumerate_space(space(tp=[1, 2], pp=[1, 2], micro_batch_size=[1, 2, 4]), tiny_train(), 4, 4)
    ordered = sorted(valid, key=lambda c: cost(c, tiny_train()))
    search = Search(list(ordered), {c.key: None for c in valid}, True, by_key={c.key: c for c in valid})
    first = [search.next() for _ in range(4)]
    assert len({c.layout for c in first}) == 4  # one of each layout
    for c, tokens in zip(first, (100.0, 300.0, 50.0, 10.0), strict=True):
        search.results[c.key] = {"key": c.key, "status": "ok", "metric": tokens}
    assert search.next().layout == first[1].layout  # then the layout that measured best
    assert search.best()["key"] == first[1].key


def test_dominance_skips_what_cannot_fit_or_cannot_be_faster():
    valid, _ = enumerate_space(
        space(tp=[1], pp=[1], micro_batch_size=[1, 2], recompute_granularity=[None, "selective"]), tiny_train(), 4, 4
    )
    by = {(c.micro_batch_size, c.recompute_granularity): c for c in valid}
    predicted = {by[1, None].key: 100, by[2, None].key: 200, by[1, "selective"].key: 90, by[2, "selective"].key: 150}
    search = Search([], predicted, True, by_key={c.key: c for c in valid})
    search.results[by[1, "selective"].key] = {"key": by[1, "selective"].key, "status": "oom"}
    reason = search.dominated(by[2, None])
    assert reason and "ran out of memory" in reason  # more memory than an OOM of the same layout
    search.results = {
        by[1, None].key: {"key": by[1, None].key, "status": "ok", "metric": 50.0},
        by[2, None].key: {"key": by[2, None].key, "status": "ok", "metric": 80.0},
    }
    reason = search.dominated(by[1, "selective"])
    assert reason and "plus more recomputation" in reason and "the best is 80" in reason
    assert "plus more recomputation" in search.dominated(by[2, "selective"])  # never faster than the best itself
    search.results = {by[2, None].key: {"key": by[2, None].key, "status": "oom"}}
    assert search.dominated(by[2, "selective"]) is None  # recompute is what may make it fit
    assert (
        Search([], predicted, False, by_key=search.by_key, results=search.results).dominated(by[1, "selective"]) is None
    )  # exhaustive skips nothing


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+experiment.auto_tuner={space: {tpp: [1, 2]}}"],
            "experiment.auto_tuner.space.tpp: unknown key (did you mean 'tp'?)",
        ),
        (
            ["+experiment.auto_tuner={space: {tp: [3]}}"],
            "none of its 1 candidate(s) runs at world size 4; the first: tp x pp x cp = 3 does not divide the world "
            "size 4",
        ),
        (
            ["+experiment.auto_tuner={space: {tp: [1, 2]}, iterations: 2, warmup_iterations: 2}"],
            "warmup_iterations=2 leaves nothing to measure",
        ),
        ([], "action=auto_tune needs experiment.auto_tuner"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_launched(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        train.main(tiny(tmp_path, *overrides))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_budget_below_the_smallest_candidate_names_the_minimum(tmp_path):
    with pytest.raises(ConfigError) as info:
        train.main(tiny(tmp_path, f"+experiment.auto_tuner={{space: {TINY_SPACE}, memory_budget_gib: 0.01}}"))
    text = str(info.value)
    assert text.startswith(
        "experiment.auto_tuner.memory_budget_gib: 0.010 GiB per rank is less than every candidate needs; the "
        "smallest (tp2-pp2-dp1-ep1-cp1-vpp1-mbs1-sp_auto-do_off-rc_none) is predicted at 0.032 GiB per rank: "
        "give at least 0.032 GiB"
    ), text
    assert "\n" not in text and list(tmp_path.iterdir()) == []


def test_the_memory_model_prunes_what_exceeds_the_budget():
    from flagscale.tune.space import predicted_bytes

    t = tiny_train()
    valid, _ = enumerate_space(space(tp=[1, 2], pp=[1, 2], micro_batch_size=[1, 2, 4]), t, 4, 4)
    predicted = {c.key: predicted_bytes(c, t, 4, 257) for c in valid}
    # more micro-batch, more activations; more model parallelism, fewer parameters per rank
    by = {(c.tp, c.pp, c.micro_batch_size): predicted[c.key] for c in valid}
    assert by[1, 1, 1] < by[1, 1, 2] and by[2, 2, 1] < by[1, 1, 1]
    limit = sorted(predicted.values())[len(predicted) // 2]
    fits = [c for c in valid if predicted[c.key] <= limit]
    assert 0 < len(fits) < len(valid) and all(predicted[c.key] > limit for c in valid if c not in fits)


def test_history_is_rewritten_whole_and_read_back(tmp_path):
    h = History(tmp_path, {"task": "train"})
    h.set("a", status="ok", metric=1.5, settings={"tensor_model_parallel_size": 1})
    h.set("b", status="running", launches=1, settings={"tensor_model_parallel_size": 2})
    h.save()
    again = History(tmp_path, {}).load()
    assert again["a"]["metric"] == 1.5 and again["b"]["status"] == "running"
    csv = (tmp_path / "history.csv").read_text().splitlines()
    assert csv[0].startswith("key,status,metric") and csv[0].endswith("tensor_model_parallel_size")
    assert not list(tmp_path.glob("*.tmp"))


def test_a_finished_trial_in_the_history_is_taken_as_it_is(tmp_path):
    from flagscale.tune.train import _trial

    valid, _ = enumerate_space(space(tp=[1]), tiny_train(), 4, 4)
    before = {"key": valid[0].key, "status": "ok", "metric": 9.0, "launches": 1, "started_at": 1.0}
    h = History(tmp_path, {})
    record = _trial(valid[0], train_tuner_settings({}), h, before, {"experiment": {"exp_dir": str(tmp_path / "x")}})
    assert record["reused"] and record["launches"] == 1 and record["started_at"] == 1.0
    assert not (tmp_path / "x").exists()  # nothing launched


def test_the_best_config_is_the_experiment_with_the_candidates_values(tmp_path):
    plain = to_plain(tiny(tmp_path, f"+experiment.auto_tuner={{space: {TINY_SPACE}}}"))
    valid, _ = enumerate_space(space(tp=[2], micro_batch_size=[4]), tiny_train(), 4, 4)
    config = best_config(plain, valid[0])
    assert "auto_tuner" not in config["experiment"] and config["action"] == "run"
    assert config["train"]["system"]["tensor_model_parallel_size"] == 2
    assert config["train"]["model"]["micro_batch_size"] == 4
    train_settings(config["train"]).check(4)  # it runs at the experiment's world size


# ------------------------------------------------------------------------------------ integration
@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    from megatron_env import megatron_env

    return megatron_env(tmp_path_factory)


def _history(folder: Path) -> dict[str, dict]:
    try:
        return {r["key"]: r for r in json.loads((folder / "history.json").read_text())["candidates"]}
    except (OSError, ValueError, KeyError):
        return {}


@pytest.mark.integration
def test_a_tuner_killed_during_a_trial_resumes_without_rerunning_finished_trials(venv, tmp_path):
    from megatron_env import run_env

    corpus = venv.corpus()
    folder = tmp_path / "auto_tune"
    tuner = (
        "+experiment.auto_tuner={space: {tp: [1, 2], micro_batch_size: [1, 2]}, iterations: 6, warmup_iterations: 2,"
        " strategy: exhaustive, max_trials: 3, trial_timeout: 120}"
    )
    argv = [
        str(venv.flagscale),
        "train",
        str(LLAMA3),
        "--config-name",
        "tiny",
        f"experiment.exp_dir={tmp_path}",
        f"train.data.data_path={corpus}",
        "action=auto_tune",
        tuner,
    ]
    first = subprocess.Popen(argv, cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_in = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and first.poll() is None:
        h = _history(folder)
        running = [k for k, r in h.items() if r.get("status") == "running"]
        if running and any(r.get("status") == "ok" for r in h.values()):
            time.sleep(2)  # well into the second trial: its ranks are up
            killed_in = running[0]
            os.kill(first.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    first.wait(10)
    assert killed_in is not None, first.stdout.read().decode()[-3000:] if first.stdout else ""
    before = _history(folder)
    finished = {k: r for k, r in before.items() if r.get("status") == "ok"}
    assert len(finished) == 1

    second = subprocess.run(argv, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _history(folder)
    ran = {k: r for k, r in after.items() if r.get("status") == "ok"}
    assert len(ran) == 3 and killed_in in ran and set(finished) < set(ran)
    for key, record in finished.items():  # taken from the history, not run again
        assert record["started_at"] == ran[key]["started_at"] and ran[key]["launches"] == 1
        metrics = (Path(record["exp_dir"]) / "logs" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in metrics] == [1, 2, 3, 4, 5, 6]
    assert ran[killed_in]["launches"] == 2  # the interrupted trial, and only it, ran again
    assert all(r["metric"] > 0 and 0 < r["peak_memory_gib"] < 4 for r in ran.values())  # the runs' own records
    assert "(from history)" in second.stdout
    # the rest are recorded as not run, with the reason
    assert {r["status"] for k, r in after.items() if k not in ran} == {"skipped"}
    best = (folder / "best.yaml").read_text()
    assert "auto_tuner" not in best and max(ran.values(), key=lambda r: r["metric"])["key"] in best


def _doc_examples() -> list[tuple[str, str, int | None, dict]]:
    """(recipe folder, config name, world size if the comment names one, auto_tuner) of docs/auto_tune.md's
    training examples."""
    import re

    import yaml

    text = (REPO_ROOT / "docs" / "auto_tune.md").read_text()
    found = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        head = re.match(r"# (examples/\S+/conf) --config-name (\S+)(?:\s+\(world size (\d+)\))?", block)
        if head:
            world = int(head.group(3)) if head.group(3) else None
            found.append((head.group(1), head.group(2), world, yaml.safe_load(block)["auto_tuner"]))
    return found


def test_every_recipe_example_in_the_docs_enumerates_against_its_recipe():
    examples = _doc_examples()
    assert {(folder.split("/")[1], name) for folder, name, _, _ in examples} == {
        ("llama3", "tiny"),
        ("llama3", "8b"),
        ("qwen3", "8b"),
        ("qwen3", "30b_a3b"),
        ("mixtral", "8x7b"),
        ("deepseek_v3", "16b_a3b"),
    }
    for folder, name, world, block in examples:
        plain = to_plain(compose(REPO_ROOT / folder, name))
        runner = plain["experiment"]["runner"]
        world = world or runner["nproc_per_node"] * runner["nnodes"]
        tuner = train_tuner_settings(block)
        valid, _ = enumerate_space(tuner.space, train_settings(plain["train"]), world, runner["nproc_per_node"])
        assert len(valid) >= 4, (folder, name, len(valid))
