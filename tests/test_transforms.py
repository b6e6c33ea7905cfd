"""Transformations (flagscale/transforms): selectors, chained and detached hooks, state scopes, the YAML list,
and TaylorSeer on a tiny diffusers FLUX transformer in the multimodal venv."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

from flagscale.errors import ConfigError
from flagscale.transforms import ByName, ByRegex, ByType, Root, Transformation, apply, links_of, parse, to_data
from flagscale.transforms.builtin import TaylorSeer
from flagscale.transforms.specs import Select, TaylorSeerSpec


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Denoiser(nn.Module):
    """A toy denoiser with the FLUX calling convention: `timestep` by keyword, blocks in a ModuleList."""

    def __init__(self, dim: int = 8, depth: int = 3):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, timestep=None):
        x = self.proj_in(x) * (1 + (0 if timestep is None else timestep.reshape(-1, 1)))
        for block in self.blocks:
            x = block(x)
        return (self.proj_out(x),)


class Add(Transformation):
    """Adds a constant to the output: composing two shows the order."""

    def __init__(self, value: float, **kw):
        super().__init__(**kw)
        self.value = value

    def wrap(self, module, name, inner):
        return lambda *a, **k: inner(*a, **k) * 2 + self.value


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Denoiser().eval()


def names(handle, transformation=None):
    return handle.modules(transformation or handle.transformations[-1])


# ---------------------------------------------------------------------------------------- selectors
def test_selectors_match_exactly_the_modules_named(model):
    pick = lambda sel: [n for n, _ in sel.matches(model)]  # noqa: E731
    assert pick(ByType("Block")) == ["blocks.0", "blocks.1", "blocks.2"]
    assert pick(ByType(nn.GELU)) == ["blocks.0.mlp.1", "blocks.1.mlp.1", "blocks.2.mlp.1"]
    assert pick(ByType("torch.nn.modules.linear.Linear") & ByName("blocks.1.*")) == [
        "blocks.1.attn",
        "blocks.1.mlp.0",
        "blocks.1.mlp.2",
    ]
    assert pick(ByName("proj_*") | ByRegex(r"blocks\.[02]\.attn")) == [
        "proj_in",
        "blocks.0.attn",
        "blocks.2.attn",
        "proj_out",
    ]
    assert pick(ByType("Linear") & ~ByName("blocks.*")) == ["proj_in", "proj_out"]
    assert pick(Root()) == [""]
    # the YAML spelling: keys and-ed, any/all/not nested
    (spec,) = parse(
        [{"name": "log_io", "select": {"type": "Linear", "any": [{"name": "*.attn"}, {"regex": "proj_.*"}]}}]
    )
    handle = apply(model, [spec])
    assert names(handle) == ["proj_in", "blocks.0.attn", "blocks.1.attn", "blocks.2.attn", "proj_out"]
    handle.remove()
    (spec,) = parse([{"name": "log_io", "select": {"type": ["Block", "GELU"], "not": {"name": "blocks.0*"}}}])
    with apply(model, [spec]) as handle:
        assert names(handle) == ["blocks.1", "blocks.1.mlp.1", "blocks.2", "blocks.2.mlp.1"]


def test_matching_nothing_is_an_error_naming_it_and_attaches_nothing(model):
    specs = parse(
        [{"name": "log_io", "select": {"type": "Linear"}}, {"name": "taylorseer", "select": {"type": "Blok"}}]
    )
    with pytest.raises(ConfigError) as err:
        apply(model, specs)
    message = str(err.value)
    assert "transformations[1]" in message and "'taylorseer'" in message and "type=Blok" in message
    assert "did you mean type 'Block'" in message
    assert all(not links_of(m) and "forward" not in m.__dict__ for m in model.modules())


# ------------------------------------------------------------------------------------- chain/detach
def test_hooks_chain_in_order_and_detach_bit_identically(model):
    x, t = torch.randn(4, 8), torch.full((4,), 0.5)
    reference = model(x, timestep=t)[0]
    first = Add(1.0, select=ByName("proj_out"))
    second = Add(10.0, select=ByName("proj_out"))
    h1 = apply(model, first)
    h2 = apply(model, [second])
    out = model.proj_out(x)
    plain = nn.functional.linear(x, model.proj_out.weight, model.proj_out.bias)
    # the first applied sees the call first: first(second(forward))
    assert torch.equal(out, (plain * 2 + 10.0) * 2 + 1.0)
    h1.remove()  # out of order: the rest of the chain stays
    assert torch.equal(model.proj_out(x), plain * 2 + 10.0)
    h2.remove()
    h2.remove()  # idempotent
    assert "forward" not in model.proj_out.__dict__ and not links_of(model.proj_out)
    assert torch.equal(model(x, timestep=t)[0], reference)


def test_taylorseer_on_blocks_then_remove_is_bit_identical(model):
    x = torch.randn(2, 8)
    steps = [torch.full((2,), v) for v in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)]
    reference = [model(x, timestep=t)[0] for t in steps]
    specs = parse([{"name": "taylorseer", "select": {"type": "Block"}, "warmup": 2, "interval": 2, "order": 1}])
    calls = []
    counter = model.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    with apply(model, specs) as handle:
        cached = [model(x, timestep=t)[0] for t in steps]
        assert handle.context.step == 5
    counter.remove()
    # steps 0, 1 warm up, then one computed in every 2: 3, 5; steps 2 and 4 extrapolated
    assert len(calls) == 4
    for i in (0, 1, 3, 5):
        assert torch.equal(cached[i], reference[i])
    for i in (2, 4):
        assert not torch.equal(cached[i], reference[i])
    assert [torch.equal(model(x, timestep=t)[0], r) for t, r in zip(steps, reference, strict=True)] == [True] * 6


def test_taylor_extrapolation_follows_the_schedule_and_a_line_exactly():
    """A module whose output is linear in the step: the predicted steps are exact (the 2nd difference is 0)."""

    class Line(nn.Module):
        def forward(self, x, timestep=None):
            return x * (1 + 2 * (10.0 - float(timestep[0])))

    module, x = Line(), torch.ones(3)
    spec = TaylorSeerSpec(select=Select(root=True), warmup=3, interval=4, order=2)
    with apply(module, [spec]) as handle:
        outs = [module(x, timestep=torch.tensor([10.0 - s])) for s in range(8)]
        seer = next(t for t in handle.transformations if isinstance(t, TaylorSeer))
        assert [seer.full(s) for s in range(8)] == [True, True, True, False, False, False, True, False]
    for s, out in enumerate(outs):
        torch.testing.assert_close(out, x * (1 + 2 * s))


# --------------------------------------------------------------------------------- context, scopes
def test_state_scopes_keep_cfg_passes_apart():
    """Two calls per step (CFG's conditional and unconditional passes): each extrapolates its own features."""

    class Echo(nn.Module):
        def forward(self, x, timestep=None):
            return x * (2.0 - float(timestep[0]))

    module = Echo()
    cond, uncond = torch.ones(2), -10 * torch.ones(2)
    spec = TaylorSeerSpec(warmup=2, interval=3, order=1)
    with apply(module, [spec]) as handle:
        for step in range(3):
            t = torch.tensor([1.0 - 0.1 * step])
            out_c, out_u = module(cond, timestep=t), module(uncond, timestep=t)
            assert handle.context.step == step and handle.context.call == 1
        # step 2 is extrapolated, per scope: linear in the step, so exact
        torch.testing.assert_close(out_c, cond * 1.2)
        torch.testing.assert_close(out_u, uncond * 1.2)
        # a rising timestep is a new generation: the state is dropped, the step restarts
        module(cond, timestep=torch.tensor([1.0]))
        assert handle.context.step == 0 and len(handle.context._store) == 1


def test_scopes_by_batch_splits_the_halves():
    seen = []

    class Probe(Transformation):
        def wrap(self, module, name, inner):
            def forward(x, timestep=None):
                seen.append((self.context.scope, tuple(x.shape)))
                return inner(x, timestep=timestep)

            return forward

    model = Denoiser().eval()
    x, t = torch.randn(4, 8), torch.full((4,), 0.3)
    reference = model(x, timestep=t)[0]
    specs = [*parse([{"name": "scopes", "by": "batch"}]), Probe(select=Root())]
    with apply(model, specs):
        out = model(x, timestep=t)[0]
    assert seen == [(("batch", 0), (2, 8)), (("batch", 1), (2, 8))]
    torch.testing.assert_close(out, reference)


def test_the_step_tracker_is_added_first_or_must_come_first(model):
    x, t = torch.randn(2, 8), torch.full((2,), 0.5)
    seer = TaylorSeer(TaylorSeerSpec(select=Select(type=("Block",))))
    with apply(model, [seer, {"name": "log_io", "select": {"name": "proj_out"}}]) as handle:  # objects and data
        assert [t.kind for t in handle.transformations] == ["timestep", "taylorseer", "log_io"]
        model(x, timestep=t)
        assert handle.context.step == 0 and links_of(model)[0].transformation.kind == "timestep"
    with pytest.raises(ConfigError, match=r"transformations\[1\]: put `timestep` before transformations\[0\]"):
        apply(model, [{"name": "taylorseer"}, {"name": "timestep"}])
    assert not any(links_of(m) for m in model.modules())


def test_log_io_writes_shapes_dtypes_and_timings(model, tmp_path):
    path = tmp_path / "io.jsonl"
    specs = parse([{"name": "log_io", "select": {"type": "Block"}, "path": str(path)}])
    with apply(model, specs):
        for v in (1.0, 0.5):
            model(torch.randn(2, 8), timestep=torch.full((2,), v))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["module"], r["step"], r["timestep"]) for r in records] == [
        (f"blocks.{i}", s, t) for s, t in ((0, 1.0), (1, 0.5)) for i in range(3)
    ]
    assert records[0]["inputs"] == [{"shape": [2, 8], "dtype": "float32"}]
    assert records[0]["outputs"] == {"shape": [2, 8], "dtype": "float32"} and records[0]["ms"] >= 0


def test_compile_a_tiny_module():
    torch.manual_seed(0)
    module, x = nn.Linear(4, 4), torch.randn(2, 4)
    reference = module(x)
    with apply(module, parse([{"name": "compile", "backend": "eager"}])):
        torch.testing.assert_close(module(x), reference)
    assert torch.equal(module(x), reference)


# ------------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize(
    "raw, message",
    [
        ({"name": "taylorsear"}, ".name=taylorsear: unknown transformation (did you mean 'taylorseer'?)"),
        ({"name": "taylorseer", "intervall": 2}, "(taylorseer).intervall: unknown key (did you mean 'interval'?)"),
        ({"name": "taylorseer", "interval": 0}, "(taylorseer).interval=0: expected an integer >= 1"),
        (
            {"name": "scopes", "by": "batches"},
            "(scopes).by=batches: use one of call, batch, none (did you mean 'batch'?)",
        ),
        ({"name": "log_io", "select": {}}, "(log_io).select: empty"),
        ({"name": "log_io", "select": {"regex": "("}}, "(log_io).select.regex='(': not a regular expression"),
        ({"name": "log_io", "select": {"typ": "Linear"}}, "(log_io).select.typ: unknown key (did you mean 'type'?)"),
        ({"select": {"type": "Linear"}}, ": missing `name:`"),
        ("compile", ": expected a mapping with a `name:`"),
    ],
)
def test_yaml_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse([{"name": "compile"}, raw])
    assert str(err.value).startswith("transformations[1]" + message), str(err.value)
    with pytest.raises(ConfigError, match="transformations: expected a list of transformations"):
        parse({"name": "compile"})


def test_yaml_parses_once_into_frozen_specs():
    specs = parse(
        [
            {"name": "taylorseer", "select": {"type": "FluxTransformerBlock"}, "warmup": 3, "interval": 3, "order": 2},
            {"name": "compile", "select": {"name": "transformer_blocks.*"}, "mode": "max-autotune-no-cudagraphs"},
        ]
    )
    assert specs[0] == TaylorSeerSpec(select=Select(type=("FluxTransformerBlock",)), warmup=3, interval=3, order=2)
    assert specs[1].mode == "max-autotune-no-cudagraphs" and parse(specs) is specs and parse(None) == ()
    nested = parse([{"name": "log_io", "select": {"any": [{"type": "Linear"}], "not": {"name": "a.*"}}}])
    assert parse([to_data(s) for s in (*specs, *nested)]) == (*specs, *nested)
    with pytest.raises(AttributeError):
        specs[0].order = 1  # type: ignore[misc]


# ------------------------------------------------------------------------------ diffusers (FLUX)
PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from diffusers import DiffusionPipeline
    from flagscale.transforms import apply, parse

    def psnr(a, b):  # images in [0, 1]
        return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()

    for job in json.loads(sys.argv[1]):
        pipe = DiffusionPipeline.from_pretrained(job["folder"])

        def generate():
            out = pipe(**job["call"], output_type="np", generator=torch.Generator().manual_seed(0))
            return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)

        reference = generate()
        for raw in job["runs"]:
            handle = apply(pipe, parse(raw))
            cached = generate()
            context = handle.context
            report = {"psnr": psnr(cached, reference), "same_as_uncached": torch.equal(cached, reference),
                      "modules": handle.modules(handle.transformations[-1]), "steps": context.step + 1,
                      "calls": context.call + 1, "scopes": sorted({str(scope) for _, scope in context._store})}
            handle.remove()
            report["identical_after"] = torch.equal(generate(), reference)
            print(json.dumps(report))
    """
)
BLOCKS = {"type": ["FluxTransformerBlock", "FluxSingleTransformerBlock"]}
SEER = {"name": "taylorseer", "warmup": 3, "interval": 2, "order": 2}


@pytest.mark.integration
def test_taylorseer_on_tiny_pipelines(mm_env):
    """TaylorSeer on a tiny FluxPipeline with true CFG (two transformer calls per step), on its blocks or its
    final output: the images change, within 30 dB PSNR of the uncached ones (63 and 54 dB measured); each CFG
    pass has its own scope, which is closer than one scope for both (45 dB); after remove() the images are
    bit-identical to the uncached ones. The same on an SD pipeline's UNet (the timestep passed by position, CFG
    batched as [uncond, cond], scoped by batch half)."""
    from media_models import tiny_flux, tiny_sd

    flux_call = dict(prompt="a red cube", negative_prompt="blurry", true_cfg_scale=2.0, height=32, width=32)
    sd_call = dict(prompt="a red cube", guidance_scale=3.0, height=32, width=32)
    jobs = [
        {
            "folder": str(tiny_flux(mm_env)),
            "call": {**flux_call, "num_inference_steps": 10, "max_sequence_length": 16},
            "runs": [
                [{**SEER, "select": BLOCKS}],
                [{**SEER, "select": {"type": "FluxTransformer2DModel"}}],
                [{"name": "scopes", "by": "none"}, SEER],
            ],
        },
        {
            "folder": str(tiny_sd(mm_env)),
            "call": {**sd_call, "num_inference_steps": 10},
            "runs": [[{"name": "scopes", "by": "batch"}, SEER]],
        },
    ]
    result = mm_env.run(["python", "-c", PIPELINE_SCRIPT, json.dumps(jobs)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks, final, shared, sd = (json.loads(line) for line in result.stdout.strip().splitlines()[-4:])
    for report in (blocks, final, shared, sd):
        assert report["identical_after"] and not report["same_as_uncached"] and report["steps"] == 10, report
        assert report["psnr"] >= 30, report
    for report in (blocks, final):
        assert report["calls"] == 2 and report["scopes"] == ["0", "1"], report
    assert blocks["modules"] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    assert final["modules"] == [""] and sd["modules"] == [""]
    assert shared["scopes"] == ["0"] and shared["psnr"] < final["psnr"] - 3, shared
    assert sd["calls"] == 1 and sd["scopes"] == ["('batch', 0)", "('batch', 1)"], sd
