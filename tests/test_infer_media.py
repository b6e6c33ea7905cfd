"""`flagscale infer` with the transformers and diffusers engines for real (issue 14), in the multimodal venv.

Each engine runs through `python -m flagscale infer CONF` on the tiny random-weight models of
tools/make_tiny_media.py (tests/media_models.py): a vision-language model answers prompts that carry images,
FLUX and Stable Diffusion pipelines write PNGs, a Wan pipeline writes MP4s that decode. A prompt repeated with
its seed in another batch position gives the same bytes (PNG and MP4). The `transformations:` list reaches the
pipeline (flagscale.transforms' log_io records the calls). Two denoising steps, 32x32 pixels.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from media_models import tiny_flux, tiny_sd, tiny_vlm, tiny_wan

from flagscale.errors import ConfigError
from flagscale.infer.hf_batch import messages_of, read_records
from flagscale.infer.settings import from_config
from flagscale.runner.config import compose

EXAMPLES = REPO_ROOT / "examples"


def infer(mm_env, example: str, tmp_path: Path, *overrides: str):
    result = mm_env.run(
        [
            "python",
            "-m",
            "flagscale",
            "infer",
            EXAMPLES / example / "conf",
            f"experiment.exp_dir={tmp_path}",
            *overrides,
        ],
        cwd=tmp_path,
        timeout=300,
    )
    return result


def index_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]


def media_prompts(tmp_path: Path) -> Path:
    """The same prompt and seed twice, in different batches beside different prompts (batch_size 2)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        '{"prompt": "a red cat", "seed": 5}\nA blue dog\n\n{"prompt": "a red cat", "seed": 5}\n', encoding="utf-8"
    )
    return prompts


# ------------------------------------------------------------------------ fast: settings and prompts (no venv)
def test_prompt_records_and_their_one_line_errors(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        'plain text\n\n{"prompt": "a", "images": "x.png"}\n{"messages": [{"role": "user", "content": "m"}]}\n'
    )
    records = read_records(str(prompts), "transformers")
    assert records == [
        {"prompt": "plain text"},
        {"prompt": "a", "images": ["x.png"]},
        {"messages": [{"role": "user", "content": "m"}]},
    ]
    assert messages_of(records[1]) == [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "a"}],
        }
    ]
    bad = {
        ('{"prompt": "a", "images": ["x.png"]}', "diffusers"): '"images" are for the transformers engine',
        ('{"messages": []}', "diffusers"): 'a JSON line needs a "prompt" field',
        ('{"prompt": "a", "seed": -1}', "diffusers"): '"seed" is an integer >= 0',
        ('{"prompt": "a", "images": [1]}', "transformers"): '"images" is a path or URL, or a list of them',
        ('{"prompt": ', "transformers"): "not a JSON object",
    }
    for (line, engine), message in bad.items():
        prompts.write_text(line + "\n")
        with pytest.raises(ConfigError, match=f"{prompts}:1: {message}"):
            read_records(str(prompts), engine)


def test_settings_of_the_hf_engines(tmp_path):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    base = [f"experiment.exp_dir={tmp_path}", f"infer.model={folder}"]
    settings = from_config(compose(EXAMPLES / "tiny_flux" / "conf", "infer", base))
    assert (settings.engine, settings.pipeline, settings.width, settings.steps) == ("diffusers", "FluxPipeline", 32, 2)
    assert settings.components == {"transformer": {"class": "FluxTransformer2DModel", "dtype": "float32"}}
    assert settings.call_args == {"max_sequence_length": 32}
    with pytest.raises(
        ConfigError, match=r"infer.pipeline: only the diffusers engine takes it \(engine is llama.cpp\)"
    ):
        from_config(compose(EXAMPLES / "tiny_llama" / "conf", "infer", [*base, "+infer.pipeline=FluxPipeline"]))
    with pytest.raises(ConfigError, match="infer.generate.batch_size=0: expected a number >= 1"):
        from_config(compose(EXAMPLES / "tiny_flux" / "conf", "infer", [*base, "infer.generate.batch_size=0"]))
    with pytest.raises(ConfigError, match="infer.engine=diffuser: use one of .* \\(did you mean 'diffusers'\\?\\)"):
        from_config(compose(EXAMPLES / "tiny_flux" / "conf", "infer", [*base, "+infer.engine=diffuser"]))


# ------------------------------------------------------------------------ the engines, in the multimodal venv
@pytest.mark.integration
def test_vlm_answers_prompts_that_carry_images(mm_env, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = infer(
        mm_env,
        "tiny_vlm",
        tmp_path,
        f"infer.model={tiny_vlm(mm_env)}",
        f"infer.generate.prompts={EXAMPLES / 'tiny_vlm' / 'prompts.jsonl'}",
        f"infer.generate.output={out}",
        "infer.generate.max_tokens=6",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r.get("images", [])) for r in records] == [1, 2, 0, 0]
    assert "messages" in records[3]  # an OpenAI conversation with an image_url part
    for record in records:
        assert record["completion"] and record["completion_tokens"] == 6 and record["finish_reason"] == "length"
        assert record["latency_s"] > 0 and set(record["timings"]) == {"preprocess_s", "generate_s", "total_s"}
    # each image is 16 tokens in the prompt (56x56 pixels, 14-pixel patches): a second image adds 16 more
    with_one, with_two = records[0]["prompt_tokens"], records[1]["prompt_tokens"]
    assert with_one > 16 and with_two >= with_one + 16


@pytest.mark.integration
def test_flux_writes_pngs_and_the_same_seed_gives_the_same_bytes(mm_env, tmp_path):
    out = tmp_path / "images"
    result = infer(
        mm_env,
        "tiny_flux",
        tmp_path,
        f"infer.model={tiny_flux(mm_env)}",
        f"infer.generate.prompts={media_prompts(tmp_path)}",
        f"infer.generate.output={out}",
        f"infer.transformations=[{{name: log_io, path: {tmp_path}/io.jsonl}}]",  # select omitted: the denoiser
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the transformations list reached the pipeline: one record per transformer call, 2 steps x 2 batches
    calls = [json.loads(line) for line in (tmp_path / "io.jsonl").read_text().splitlines()]
    assert [(c["type"], c["step"]) for c in calls] == [("FluxTransformer2DModel", s) for s in (0, 1, 0, 1)]
    index = index_of(out)
    assert [(r["prompt"], r["seed"], r["file"]) for r in index] == [
        ("a red cat", 5, "0000-seed5.png"),
        ("A blue dog", 1, "0001-seed1.png"),
        ("a red cat", 5, "0002-seed5.png"),
    ]
    data = [(out / r["file"]).read_bytes() for r in index]
    assert data[0] == data[2] != data[1]
    png = data[1]  # the signature, then IHDR: width, height, bit depth 8, colour type 2 (RGB)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">IIBB", png[16:26]) == (32, 32, 8, 2)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r["file"] for r in index), "index.jsonl"])
    assert not list(tmp_path.glob(".images.*"))  # the temporary folder is gone


@pytest.mark.integration
def test_stable_diffusion_unet_pipeline_in_mixed_dtypes_writes_pngs(mm_env, tmp_path):
    out = tmp_path / "images"
    result = infer(
        mm_env,
        "tiny_sd",
        tmp_path,
        f"infer.model={tiny_sd(mm_env)}",
        f"infer.generate.prompts={media_prompts(tmp_path)}",
        f"infer.generate.output={out}",
        "+infer.components.unet.dtype=bfloat16",  # mixed dtypes: a bfloat16 UNet between float32 CLIP and VAE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = [out / r["file"] for r in index_of(out)]
    assert [f.read_bytes()[:8] for f in files] == [b"\x89PNG\r\n\x1a\n"] * 3
    assert files[0].read_bytes() == files[2].read_bytes()  # classifier-free guidance with a negative prompt too


@pytest.mark.integration
def test_wan_writes_mp4s_that_decode(mm_env, tmp_path):
    def run(out: Path):
        return infer(
            mm_env,
            "tiny_wan",
            tmp_path,
            f"infer.model={tiny_wan(mm_env)}",
            f"infer.generate.prompts={media_prompts(tmp_path)}",
            f"infer.generate.output={out}",
            "infer.generate.batch_size=2",
        )

    out = tmp_path / "videos"
    result = run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    index = index_of(out)
    assert [(r["file"], r["frames"], r["fps"]) for r in index] == [
        ("0000-seed5.mp4", 5, 8),
        ("0001-seed1.mp4", 5, 8),
        ("0002-seed5.mp4", 5, 8),
    ]
    data = [(out / r["file"]).read_bytes() for r in index]
    assert data[0] == data[2] != data[1]
    # decoded by PyAV (FFmpeg) in the venv: 5 frames of 32x32
    check = (
        "import av, sys\n"
        "with av.open(sys.argv[1]) as c:\n"
        "    frames = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]\n"
        "print(len(frames), frames[0].shape)\n"
    )
    decoded = mm_env.run(["python", "-c", check, out / "0001-seed1.mp4"])
    assert decoded.returncode == 0 and decoded.stdout.split("\n")[0] == "5 (32, 32, 3)", decoded.stderr
    # the same seeds in another process: the same bytes, every file
    again = run(tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(tmp_path / "again" / r["file"]).read_bytes() for r in index] == data


@pytest.mark.integration
def test_a_folder_of_another_kind_is_a_one_line_error(mm_env, tmp_path):
    sd, vlm = tiny_sd(mm_env), tiny_vlm(mm_env)
    prompts = media_prompts(tmp_path)
    cases = {
        ("tiny_flux", f"infer.model={sd}"): f"{sd}: model_index.json says StableDiffusionPipeline, not FluxPipeline",
        ("tiny_flux", f"infer.model={vlm}"): f"{vlm}: no model_index.json, not a diffusers pipeline folder",
        ("tiny_vlm", f"infer.model={sd}"): f"{sd}: no config.json, not a transformers model folder",
        ("tiny_flux", f"infer.model={tmp_path}/none"): f"{tmp_path}/none: no such folder",
        ("tiny_vlm", "+infer.pipeline=FluxPipeline"): "infer.pipeline: only the diffusers engine takes it",
        ("tiny_flux", "infer.components.transformer.dtype=float8"): "infer.components.transformer.dtype=float8: use",
        ("tiny_flux", "infer.transformations=[{name: taylorsear}]"): "infer.transformations[0].name=taylorsear",
    }
    for (example, override), message in cases.items():
        model = [f"infer.model={vlm}"] if example == "tiny_vlm" and "model" not in override else []
        result = infer(mm_env, example, tmp_path, *model, f"infer.generate.prompts={prompts}", override)
        assert result.returncode == 2, (override, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (override, result.stderr)
    assert not (tmp_path / "images").exists()
