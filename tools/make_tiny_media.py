#!/usr/bin/env python3
"""Make tiny random-weight multimodal models, fully offline (no hub access), for tests, examples and benchmarks.

    tools/make_tiny_media.py vlm  OUT [--seed 0]       # LLaVA: AutoProcessor + AutoModelForImageTextToText
    tools/make_tiny_media.py llm  OUT [--seed 0]       # Qwen2 causal LM: AutoTokenizer + AutoModelForCausalLM
    tools/make_tiny_media.py flux OUT [--layers 1 --single-layers 1 --heads 2 --head-dim 16]   # FluxPipeline
    tools/make_tiny_media.py sd   OUT [--seed 0]       # StableDiffusionPipeline (UNet)
    tools/make_tiny_media.py wan  OUT [--seed 0]       # WanPipeline (text-to-video)

Each folder is what the library's own `from_pretrained` reads: weights in safetensors, configs, and tokenizers
trained here on made-up text with the `tokenizers` library (through transformers' `train_new_from_iterator`, which
keeps each tokenizer class's own normalizer and pre-tokenizer). The weights are random: outputs are noise and
gibberish, which is all tests and benchmarks need. Same arguments, same files.

Needs the `multimodal` extra (transformers 5, diffusers). The functions (`make_vlm`, `make_flux`, ...) are the API
the tests (tests/media_models.py) and benchmarks call.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

SYLLABLES = "ka lo mi ne ru sa ti vo ze po an el is on ur be da fi go hu".split()
ENGLISH = "a an the of and to in photo picture image video cat dog red blue green what is this describe tiny".split()
# Qwen2's special tokens (ChatML), and LLaVA's image placeholder that the processor expands to the image's tokens.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKEN = "<image>"
# ChatML; content is a string or a list of parts (text as is, an image as the placeholder): both the LLM and VLM.
VLM_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus(seed: int, lines: int = 3000) -> list[str]:
    """Deterministic made-up text with a few English words (prompts in tests tokenize to real pieces)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)] + ENGLISH * 4
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))).capitalize() + "." for _ in range(lines)]


def train_tokenizer(cls: Any, vocab: int, seed: int, **kwargs: Any) -> Any:
    """A `cls` tokenizer (transformers 5, tokenizers-backed) trained on `corpus`: its own pipeline, a new vocab."""
    return cls().train_new_from_iterator(corpus(seed), vocab, show_progress=False, **kwargs)


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------ language models
def qwen_tokenizer(seed: int, vocab: int = 512, special: list[str] = QWEN_SPECIAL) -> Any:
    from transformers import Qwen2Tokenizer

    tok = train_tokenizer(Qwen2Tokenizer, vocab, seed, new_special_tokens=special)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = VLM_TEMPLATE
    tok.model_max_length = 2048
    return tok


def make_llm(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A Qwen2 causal LM: AutoTokenizer + AutoModelForCausalLM (and `convert_hf_to_gguf.py`) read it."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer(seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    _seeded(seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_vlm(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, image_size: int = 56) -> Path:
    """A LLaVA model (CLIP vision tower, Qwen2 language model): AutoProcessor + AutoModelForImageTextToText read
    it. Images are resized and cropped to `image_size` pixels: (56 / 14)^2 = 16 image tokens.

    LLaVA, not Qwen2-VL: transformers 5's Qwen2-VL processor needs its video processor, which needs torchvision,
    and the package index has no CPU build of torchvision for torch 2.13 (the CUDA one cannot load its ops)."""
    from transformers import (
        CLIPImageProcessorPil,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer(seed, special=[*QWEN_SPECIAL, IMAGE_TOKEN])
    ids = {t: tok.convert_tokens_to_ids(t) for t in [*QWEN_SPECIAL, IMAGE_TOKEN]}
    patch = 14
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=VLM_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    _seeded(seed)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_index=ids[IMAGE_TOKEN],
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------ text encoders
def clip_text(seed: int, hidden: int = 32) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = train_tokenizer(CLIPTokenizer, 512, seed)
    tok.model_max_length = 77
    _seeded(seed)
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return tok, CLIPTextModel(config).eval()


def t5_text(seed: int, hidden: int = 32, umt5: bool = False) -> tuple[Any, Any]:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel

    tok = train_tokenizer(T5Tokenizer, 600, seed)
    tok.model_max_length = 512
    _seeded(seed + 1)
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tok),
        d_model=hidden,
        d_kv=8,
        d_ff=hidden * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return tok, model_cls(config).eval()


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's rotary dims over (text index, height, width): even numbers that sum to the head dim."""
    if head_dim % 8:
        raise SystemExit(f"--head-dim {head_dim}: must be a multiple of 8 (three even rotary axes)")
    first = head_dim // 4 // 2 * 2
    second = (head_dim - first) // 2 // 2 * 2
    return first, second, head_dim - first - second


# ------------------------------------------------------------------------------------ diffusion pipelines
def make_flux(
    out: Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_dim: int = 32,
    guidance_embeds: bool = False,
) -> Path:
    """A FluxPipeline (FLUX.1-schnell layout, or -dev with guidance_embeds): FluxTransformer2DModel, AutoencoderKL
    (2x spatial down-sampling, 4 latent channels), CLIP + T5 text encoders. Pass bigger transformer dimensions for
    a benchmark model (e.g. num_layers=4, num_single_layers=8, num_attention_heads=8, attention_head_dim=64)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder = clip_text(seed, text_dim)
    tokenizer_2, text_encoder_2 = t5_text(seed, text_dim)
    _seeded(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    _seeded(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=rope_axes(attention_head_dim),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out)
    return out


def make_sd(out: Path, *, seed: int = 0) -> Path:
    """A StableDiffusionPipeline: UNet2DConditionModel, AutoencoderKL (2x down-sampling), CLIP text encoder, no
    safety checker."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder = clip_text(seed, 32)
    _seeded(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    _seeded(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def make_wan(out: Path, *, seed: int = 0) -> Path:
    """A WanPipeline (Wan2.1 text-to-video layout): WanTransformer3DModel, AutoencoderKLWan (8x spatial, 4x
    temporal down-sampling), UMT5 text encoder. Frames: 4k+1; sides: multiples of 16."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    out.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder = t5_text(seed, 32, umt5=True)
    _seeded(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    _seeded(seed + 3)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(out)
    return out


MAKERS = {"vlm": make_vlm, "llm": make_llm, "flux": make_flux, "sd": make_sd, "wan": make_wan}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(MAKERS), help="which model to make")
    parser.add_argument("out", type=Path, help="folder to write it to")
    parser.add_argument("--seed", type=int, default=0)
    flux = parser.add_argument_group("flux transformer")
    flux.add_argument("--layers", type=int, default=1, help="double-stream blocks")
    flux.add_argument("--single-layers", type=int, default=1, help="single-stream blocks")
    flux.add_argument("--heads", type=int, default=2)
    flux.add_argument("--head-dim", type=int, default=16)
    flux.add_argument("--guidance-embeds", action="store_true", help="FLUX.1-dev layout (distilled guidance)")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {"seed": args.seed}
    if args.kind == "flux":
        kwargs.update(
            num_layers=args.layers,
            num_single_layers=args.single_layers,
            num_attention_heads=args.heads,
            attention_head_dim=args.head_dim,
            guidance_embeds=args.guidance_embeds,
        )
    try:
        MAKERS[args.kind](args.out, **kwargs)
    except ImportError as exc:
        print(f"error: {exc}: pip install 'flagscale[multimodal]' (transformers 5, diffusers)", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
