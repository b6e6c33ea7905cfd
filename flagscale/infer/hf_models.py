"""Hugging Face models from a local folder, for `flagscale infer` and the serving engines (issue 14).

    model = load_chat_model("/models/vlm", dtype="float32", device="cpu")      # causal LM or vision-language
    result = model.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                      {"type": "text", "text": "What is this?"}]}], max_tokens=32)
    result.text, result.prompt_tokens, result.completion_tokens, result.timings

    pipe = load_pipeline("/models/flux", pipeline="FluxPipeline", components={"transformer": {"dtype": "bfloat16"}})
    outs = pipe.generate(["a red cat"], seeds=[0], width=64, height=64, steps=4)
    outs[0].images     # PIL images: one for text-to-image, the frames for text-to-video (pipe.kind == "video")

Images in chat messages are OpenAI `image_url` parts whose url is a local path, a `file://` URL or a `data:` base64
URL (nothing is fetched over the network), or `{"type": "image", "image": <PIL image or path>}` parts. A folder that
is not the model or pipeline class named is a ConfigError of one line; an image that cannot be read is an
`ImageInputError` (a ValueError: a server answers 400 with its message).

Generation is deterministic for a seed: each prompt of a diffusion batch gets its own torch.Generator, so an image
does not depend on its batch-mates. Torch, transformers and diffusers are imported inside the functions.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagscale.errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16")


class ImageInputError(ValueError):
    """An image in a request or prompt that cannot be read (a bad path, URL or encoding)."""


def torch_dtype(name: str | None) -> Any:
    """The torch dtype named in a config ("auto" and None: the checkpoint's own)."""
    import torch

    if name in (None, "auto"):
        return "auto"
    if name not in DTYPES:
        raise ConfigError(f"dtype={name}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{path}: no such folder (a local {what} folder is needed; nothing is downloaded)")
    return folder


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def quiet_loading() -> None:
    """No per-file loading bars and no fallback notices (e.g. a PIL image processor standing in for a torchvision
    one) from transformers and diffusers: a batch job shows its own progress, errors still surface."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------- images
def load_image(url: Any, base_dir: str | Path | None = None) -> Any:
    """A PIL RGB image from a path, a file:// URL, a data: base64 URL, or a PIL image as is."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(url, Image.Image):
        return url.convert("RGB")
    if not isinstance(url, str) or not url:
        raise ImageInputError(f"image url: expected a string, got {type(url).__name__}")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ImageInputError("image url: a data: URL must be base64 (data:image/png;base64,...)")
        try:
            source: Any = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise ImageInputError("image url: the data: URL is not valid base64") from None
        name = "data: URL"
    else:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme == "file":
            local = Path(urllib.parse.unquote(parsed.path))
        elif parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
            local = Path(url).expanduser()
            if not local.is_absolute() and base_dir is not None:
                local = Path(base_dir) / local
        else:
            raise ImageInputError(f"image url {url[:80]}: only local paths, file:// and data: URLs are read")
        if not local.is_file():
            raise ImageInputError(f"image {local}: no such file")
        source, name = local, str(local)
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageInputError(f"image {name}: not an image Pillow can read ({exc.__class__.__name__})") from None


def _image_of(part: dict, base_dir: str | Path | None) -> Any:
    if part.get("type") == "image":
        return load_image(part.get("image", part.get("url")), base_dir)
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    return load_image(url, base_dir)


def split_images(messages: list[dict], base_dir: str | Path | None = None) -> tuple[list[dict], list[Any]]:
    """(messages with each image part as {"type": "image"}, the images in order): what a processor's chat
    template and its images argument take."""
    plain, images = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            plain.append({"role": message.get("role", "user"), "content": content or ""})
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "image"):
                images.append(_image_of(part, base_dir))
                parts.append({"type": "image"})
            elif kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            else:
                raise ImageInputError(f"content part type {kind!r}: use text, image_url or image")
        plain.append({"role": message.get("role", "user"), "content": parts})
    return plain, images


# ---------------------------------------------------------------------------------------------- chat
@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (an end token or stop string) or "length" (max_tokens reached)
    timings: dict[str, float] = field(default_factory=dict)  # preprocess_s, generate_s, total_s


@dataclass
class ChatModel:
    """A causal LM (tokenizer) or a vision-language model (processor) loaded from a folder."""

    path: str
    model: Any
    processor: Any  # an AutoProcessor for a VLM, an AutoTokenizer for a causal LM
    vision: bool
    device: str = "cpu"

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def chat(self, messages: list[dict], **kwargs: Any) -> ChatResult:
        """One conversation (OpenAI messages) -> the assistant's reply. Keywords as in `chat_batch`."""
        return self.chat_batch([messages], **kwargs)[0]

    def chat_batch(
        self,
        conversations: Sequence[list[dict]],
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        base_dir: str | Path | None = None,
    ) -> list[ChatResult]:
        """Several conversations in one padded batch (greedy when temperature is 0; sampled with `seed` else)."""
        import torch

        start = time.perf_counter()
        inputs = self._inputs(conversations, base_dir)
        prepared = time.perf_counter()
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        width = inputs["input_ids"].shape[1]
        options: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p)
        else:  # the checkpoint's generation_config may carry sampling values: greedy ignores them quietly
            options.update(temperature=None, top_p=None, top_k=None)
        if stop:
            options.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        torch.manual_seed(seed)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        done = time.perf_counter()
        results = []
        eos = self._eos_ids()
        for row, prompt_tokens in zip(output[:, width:].tolist(), prompt_lengths, strict=True):
            tokens = _trim(row, eos, self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for word in stop:  # generate stops after a stop string; the reply ends before it
                text = text.split(word)[0] if word in text else text
            finish = "length" if len(tokens) >= max_tokens else "stop"
            timings = {
                "preprocess_s": round(prepared - start, 6),
                "generate_s": round(done - prepared, 6),
                "total_s": round(done - start, 6),
            }
            results.append(ChatResult(text, int(prompt_tokens), len(tokens), finish, timings))
        return results

    def _inputs(self, conversations: Sequence[list[dict]], base_dir: str | Path | None) -> Any:
        texts, images = [], []
        for messages in conversations:
            plain, found = split_images(messages, base_dir)
            if found and not self.vision:
                raise ImageInputError(f"{self.path} is a text-only model: it takes no image parts")
            texts.append(self._template(plain))
            images.extend(found)
        if self.vision:
            batch = self.processor(
                text=texts, images=images or None, return_tensors="pt", padding=True, add_special_tokens=False
            )
        else:
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return batch.to(self.model.device)

    def _template(self, messages: list[dict]) -> str:
        owner = self.processor if self.vision else self.tokenizer
        if getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # no template (a base LM): the text of the messages, in order
        return "\n".join(
            m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
            for m in messages
        )

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


def _trim(tokens: list[int], eos: set[int], pad: int | None) -> list[int]:
    """The generated tokens up to and including the first end token (the rest is padding of the batch)."""
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    while tokens and pad is not None and tokens[-1] == pad and pad not in eos:
        tokens = tokens[:-1]
    return tokens


def is_vision_config(config: dict) -> bool:
    return "vision_config" in config or any("ForConditionalGeneration" in a for a in config.get("architectures", []))


def check_model_folder(path: str | Path) -> Path:
    """The folder of a transformers model (it has a config.json), or a ConfigError of one line."""
    folder = _folder(path, "transformers model")
    if not (folder / "config.json").is_file():
        where = " (a diffusers pipeline: use the diffusers engine)" if (folder / "model_index.json").is_file() else ""
        raise ConfigError(f"{folder}: no config.json, not a transformers model folder{where}")
    return folder


def load_chat_model(
    path: str | Path,
    *,
    dtype: str | None = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    model_args: dict | None = None,
) -> ChatModel:
    """A causal LM or vision-language model from a local folder: AutoModelForImageTextToText + AutoProcessor when
    its config has a vision tower, AutoModelForCausalLM + AutoTokenizer otherwise."""
    folder = check_model_folder(path)
    vision = is_vision_config(read_json(folder / "config.json"))
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    loader: Any = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code, **(model_args or {})}
    try:
        model = loader.from_pretrained(folder, **kwargs).to(device).eval()
        processor = (AutoProcessor if vision else AutoTokenizer).from_pretrained(
            folder, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        kind = "vision-language" if vision else "causal LM"
        raise ConfigError(f"{folder}: cannot load it as a {kind} ({str(exc).splitlines()[0]})") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # a batch's prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ChatModel(str(folder), model, processor, vision, device)


# ---------------------------------------------------------------------------------------------- diffusion
@dataclass(frozen=True)
class Generation:
    prompt: str
    seed: int
    images: list  # PIL images: one per image, or the frames of a video
    seconds: float  # this prompt's share of its batch's time


def pipeline_class_of(folder: str | Path) -> str:
    """The pipeline class a diffusers folder's model_index.json names, or a ConfigError."""
    root = _folder(folder, "diffusers pipeline")
    index = root / "model_index.json"
    if not index.is_file():
        where = " (a transformers model: use the transformers engine)" if (root / "config.json").is_file() else ""
        raise ConfigError(f"{root}: no model_index.json, not a diffusers pipeline folder{where}")
    name = read_json(index).get("_class_name")
    if not isinstance(name, str):
        raise ConfigError(f"{index}: names no pipeline class (_class_name)")
    return name


def check_pipeline_folder(folder: str | Path, expected: str | None) -> str:
    """The folder's pipeline class; a ConfigError of one line when it is not `expected`."""
    found = pipeline_class_of(folder)
    if expected and found != expected:
        raise ConfigError(
            f"{folder}: model_index.json says {found}, not {expected} "
            f"(set pipeline: {found}, or use a {expected} folder)"
        )
    return found


def _library_class(name: str) -> Any:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        cls = getattr(library, name, None)
        if cls is not None:
            return cls
    raise ConfigError(f"component class {name}: neither diffusers nor transformers has it")


def _component(root: Path, name: str, spec: dict, index: dict, default_dtype: Any) -> Any:
    """One pipeline component loaded on its own: the class the config names (or model_index.json's), its dtype."""
    if name not in index or not isinstance(index[name], list):
        valid = ", ".join(k for k, v in index.items() if isinstance(v, list) and v[1])
        raise ConfigError(f"components.{name}: the pipeline has no such component; it has {valid}")
    unknown = set(spec) - {"class", "dtype"}
    if unknown:
        raise ConfigError(f"components.{name}.{sorted(unknown)[0]}: unknown key; a component takes class, dtype")
    cls = _library_class(str(spec.get("class") or index[name][1]))
    dtype = torch_dtype(spec["dtype"]) if spec.get("dtype") else default_dtype
    import torch

    if dtype == "auto" or not issubclass(cls, torch.nn.Module):  # tokenizers, schedulers, processors
        return cls.from_pretrained(root, subfolder=name)
    return cls.from_pretrained(root, subfolder=name, dtype=dtype)  # `dtype`: torch_dtype is deprecated in both


@dataclass
class DiffusionModel:
    """A diffusers pipeline loaded from a folder: text-to-image ("image") or text-to-video ("video")."""

    path: str
    pipe: Any
    class_name: str
    kind: str
    fps: int = 16
    transformed: Any = None  # the flagscale.transforms Handle of `transform`, reset before every generation

    def transform(self, specs: Sequence[Any], where: str = "transformations") -> Any:
        """Apply flagscale.transforms specs (raw YAML items or parsed) to the pipeline's denoiser, for its life."""
        from flagscale.transforms import apply

        self.transformed = apply(self.pipe, list(specs), where)
        return self.transformed

    def accepts(self, name: str) -> bool:
        return name in inspect.signature(self.pipe.__call__).parameters

    def call_args(
        self,
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        num_frames: int | None = None,
        negative_prompt: str | None = None,
        extra: dict | None = None,
    ) -> dict[str, Any]:
        """The pipeline call's keywords; one it does not take is a ConfigError naming it."""
        named = {
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "num_frames": num_frames,
            "negative_prompt": negative_prompt,
        }
        args = {k: v for k, v in named.items() if v is not None}
        args.update(extra or {})
        for key in args:
            if not self.accepts(key):
                raise ConfigError(f"{self.class_name} takes no {key} (its call takes: {', '.join(self._params())})")
        return args

    def _params(self) -> list[str]:
        skip = {"self", "prompt", "generator", "output_type", "return_dict", "callback_on_step_end", "kwargs"}
        return [p for p in inspect.signature(self.pipe.__call__).parameters if p not in skip]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seeds: int | Sequence[int] = 0,
        on_step: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> list[Generation]:
        """One batch: a Generation per prompt, each from its own torch.Generator(seed). `seeds` is one per prompt
        or a base (prompt i gets base + i). on_step(steps_done) is called after each denoising step.
        Keywords: width, height, steps, guidance, num_frames, negative_prompt, extra (see call_args)."""
        import torch

        seed_list = list(seeds) if isinstance(seeds, Sequence) else [int(seeds) + i for i in range(len(prompts))]
        if len(seed_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seed_list)} seeds")
        args = self.call_args(**kwargs)
        if isinstance(args.get("negative_prompt"), str):  # the pipelines take one per prompt, as the prompts
            args["negative_prompt"] = [args["negative_prompt"]] * len(prompts)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seed_list]
        if on_step is not None:
            args["callback_on_step_end"] = _step_callback(on_step)
        if self.transformed is not None:  # cached features of the previous generation must not leak into this one
            self.transformed.reset()
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.pipe(prompt=list(prompts), generator=generators, output_type="pil", **args)
        share = (time.perf_counter() - start) / max(len(prompts), 1)
        results = output.frames if self.kind == "video" else [[image] for image in output.images]
        return [
            Generation(prompt, seed, _pil_frames(images), round(share, 6))
            for prompt, seed, images in zip(prompts, seed_list, results, strict=True)
        ]


def _step_callback(on_step: Callable[[int], None]) -> Callable:
    def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        on_step(step + 1)
        return tensors

    return callback


def _pil_frames(images: Any) -> list:
    """Frames as PIL images: video pipelines return PIL lists, or float arrays in [0, 1] for some."""
    from PIL import Image

    if isinstance(images, list) and all(isinstance(i, Image.Image) for i in images):
        return images
    import numpy as np

    array = np.asarray(images)
    return [Image.fromarray((np.clip(frame, 0, 1) * 255).round().astype("uint8")) for frame in array]


def load_pipeline(
    path: str | Path,
    *,
    pipeline: str | None = None,
    dtype: str | None = "float32",
    device: str = "cpu",
    components: dict[str, dict] | None = None,
    fps: int = 16,
    load_args: dict | None = None,
) -> DiffusionModel:
    """A diffusers pipeline from a local folder. `pipeline` names the class the folder must be (None: whatever
    model_index.json says); `components` maps a component (transformer, vae, text_encoder...) to {class, dtype}:
    loaded on its own with that class and dtype; the others take `dtype`. load_args: more from_pretrained keywords."""
    root = _folder(path, "diffusers pipeline")
    found = check_pipeline_folder(root, pipeline)
    index = read_json(root / "model_index.json")
    import diffusers

    cls = getattr(diffusers, found, None)
    if cls is None:
        raise ConfigError(f"{root}: model_index.json names {found}, which diffusers {diffusers.__version__} lacks")
    default = torch_dtype(dtype)
    loaded = {
        name: _component(root, name, dict(spec or {}), index, default) for name, spec in (components or {}).items()
    }
    kwargs: dict[str, Any] = {} if default == "auto" else {"dtype": default}
    try:
        pipe = cls.from_pretrained(root, **loaded, **kwargs, **(load_args or {})).to(device)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{root}: cannot load it as {found} ({str(exc).splitlines()[0]})") from None
    pipe.set_progress_bar_config(disable=True)  # callers show their own progress
    if len({getattr(m, "dtype", None) for m in _torch_components(pipe)} - {None}) > 1:
        for module in _torch_components(pipe):
            _cast_inputs(module)
    kind = "video" if "num_frames" in inspect.signature(pipe.__call__).parameters else "image"
    return DiffusionModel(str(root), pipe, found, kind, fps)


def _torch_components(pipe: Any) -> list:
    import torch

    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]


def _cast_inputs(module: Any) -> None:
    """Mixed dtypes (a bfloat16 transformer beside a float32 VAE): the pipelines hand each component the tensors
    of the one before it, so each component casts its floating inputs to its own dtype (forward, and a VAE's
    encode and decode, which the pipelines call directly)."""
    import torch

    dtype = module.dtype

    def cast(value: Any) -> Any:
        return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def pre_hook(_module: Any, args: tuple, kwargs: dict) -> tuple:
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for name in ("encode", "decode"):
        method = getattr(module, name, None)
        if callable(method):
            setattr(module, name, _casting(method, cast))


def _casting(method: Callable, cast: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        return method(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})

    return call


# ---------------------------------------------------------------------------------------------- files
def png_bytes(image: Any) -> bytes:
    """PNG of a PIL image, byte-for-byte the same for the same pixels (no time or text chunks)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def mp4_bytes(frames: list, fps: int = 16) -> bytes:
    """H.264 MP4 of PIL frames (yuv420p, one encoder thread: the same frames give the same bytes)."""
    import av

    if not frames:
        raise ValueError("a video needs at least one frame")
    width, height = frames[0].size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "medium"})
        stream.width, stream.height = width - width % 2, height - height % 2  # yuv420p needs even sides
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").crop((0, 0, stream.width, stream.height)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()
