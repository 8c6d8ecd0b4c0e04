"""Build tiny, random-weight Qwen2.5-VL / Qwen3-VL model directories offline.

The models use the real transformers classes (``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``) and the real processor classes, with a byte-level BPE
tokenizer trained here on a small built-in corpus and Qwen's special tokens. They are saved with
``save_pretrained`` so tests and the CPU quickstart load them through exactly the code path a real
checkpoint takes (``from_pretrained`` / ``AutoProcessor``). Weights are random but seeded.

Command line: ``python tools/make_tiny_model.py --family qwen2_5_vl --out /tmp/tiny``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

# Qwen's special tokens, in the order the real vocabularies add them after the BPE merges.
# (token, is_special): the real tokenizers mark the chat and vision markers special, while
# <tool_call> and friends are plain added tokens that survive `skip_special_tokens`.
_COMMON_ADDED = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
# Qwen3's vocabulary adds the tool-response and thinking markers as plain added tokens.
_QWEN3_ADDED = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]

# Qwen2's pre-tokenizer split pattern (a documented fact of its tokenizer.json).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB_SIZE = 1536


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny networks (small enough to train a few hundred steps on 2 CPU cores)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 64


#: Size presets (``model.tiny_spec``). ``tiny``: the plumbing model of the tests and smoke runs (it
#: learns a call format, not a picture). ``demo``: about 4x the compute, the smallest that learns the
#: learning demo's task (seeing which way an image is turned) in minutes on 2 CPU cores.
TINY_SPECS: dict[str, TinySpec] = {
    "tiny": TinySpec(),
    "demo": TinySpec(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                     vision_hidden=64, vision_depth=2, vision_heads=2),
}


def _corpus() -> list[str]:
    """Text the tiny tokenizer learns merges from: prompts, code and answers of this domain."""
    from cv_ray.agent.prompts import SYSTEM_PROMPT  # the real system prompt shapes the vocabulary

    code_lines = [
        "result = image.rotate(90, expand=True)",
        "result = image.transpose(Image.ROTATE_270)",
        "result = image.transpose(Image.FLIP_LEFT_RIGHT)",
        "result = ImageOps.mirror(img)",
        "result = ImageOps.flip(img)",
        "result = image.crop((10, 20, 110, 120))",
        "arr = np.array(image)\nresult = Image.fromarray(np.rot90(arr, k=1))",
        "result = cv2.rotate(np.array(img), cv2.ROTATE_90_CLOCKWISE)",
        "result = ImageEnhance.Contrast(image).enhance(1.8)",
        "result = ImageEnhance.Brightness(image).enhance(1.5)",
        "result = image.filter(ImageFilter.SHARPEN)",
        "w, h = image.size\nresult = image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))",
    ]
    words = (
        "the image is rotated upside down mirrored flipped so I need to fix the orientation first "
        "then read the text number word digit count shapes red green blue yellow black white chart "
        "bar line value answer question what which how many is written shown in at on of and a an "
        "left right top bottom corner small region zoom crop enlarge contrast brightness dark blur "
        "Error NameError SyntaxError ValueError TypeError timeout image_index out of range try again"
    ).split()
    samples = list(code_lines)
    samples.append(SYSTEM_PROMPT)
    samples += [" ".join(words[i : i + 12]) for i in range(0, len(words), 3)]
    samples += [f"<think>{' '.join(words[i:i + 8])}</think>" for i in range(0, len(words), 5)]
    samples += [f"<answer>{n}</answer> <answer>{w}</answer>" for n, w in zip(range(0, 1000, 7), words * 20)]
    samples += [
        json.dumps({"name": "code_image_tool", "arguments": {"code": c, "description": "fix", "image_index": i}})
        for i, c in enumerate(code_lines)
    ]
    samples += [" ".join(str(n) for n in range(k, k + 40)) for k in range(0, 400, 40)]
    samples += ["ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,:;!?()[]{}<>=+-*/_'\"#%&|\\\n\t"]
    return samples * 4


def _train_tokenizer(family: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _chat_template(family: str) -> str:
    template = (Path(__file__).parent / "chat_template.jinja").read_text()
    # Qwen2.5-VL's template adds a default system turn; Qwen3-VL's does not.
    default_system = "You are a helpful assistant." if family == "qwen2_5_vl" else ""
    return template.replace("@DEFAULT_SYSTEM@", default_system)


def build_tokenizer(family: str):
    """A Qwen2 tokenizer (transformers class) over a locally trained byte-level BPE."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    raw = _train_tokenizer(family)
    added = _COMMON_ADDED + (_QWEN3_ADDED if family == "qwen3_vl" else [])
    raw.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = _chat_template(family)
    return tokenizer


def _round_up(n: int, k: int = 64) -> int:
    return (n + k - 1) // k * k


def build_tiny_model(family: str, out_dir: str | os.PathLike, seed: int = 0, spec: TinySpec = TinySpec()) -> Path:
    """Build a tiny model directory for ``family`` at ``out_dir`` and return its path.

    Written to a temporary directory and renamed into place, so a concurrent reader never sees a
    half-written model.
    """
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "cv_ray_tiny.json").exists():
        # Never replace what is not a tiny model (a real checkpoint given with model.build_tiny set).
        raise ValueError(f"{out} exists and is not a tiny model directory (no cv_ray_tiny.json): refusing to "
                         f"replace it; set model.build_tiny='' to use it as a checkpoint")
    tokenizer = build_tokenizer(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in _COMMON_ADDED}
    vocab_size = _round_up(len(tokenizer))
    text = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=32768,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    head_dim = spec.hidden_size // spec.num_heads
    # mrope sections split head_dim/2 rotary frequencies between (t, h, w).
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope}
        vision = dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[spec.vision_depth - 1],
        )
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
        image_processor = transformers.Qwen2VLImageProcessor(
            min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=14, merge_size=2
        )
        video_processor = transformers.Qwen2VLVideoProcessor(patch_size=14, merge_size=2)
        processor = transformers.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                     video_processor=video_processor,
                                                     chat_template=tokenizer.chat_template)
    else:
        text["head_dim"] = head_dim
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": mrope,
                                   "mrope_interleaved": True}
        vision = dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=144,
            deepstack_visual_indexes=[0],
        )
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
        model_cls = transformers.Qwen3VLForConditionalGeneration
        # Qwen3-VL: 16-pixel patches merged 2x2, so one token covers 32x32 pixels.
        image_processor = transformers.Qwen2VLImageProcessor(
            min_pixels=spec.min_pixels * 32 * 32 // (28 * 28),
            max_pixels=spec.max_pixels * 32 * 32 // (28 * 28),
            patch_size=16,
            merge_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        video_processor = transformers.Qwen3VLVideoProcessor(patch_size=16, merge_size=2)
        processor = transformers.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                  video_processor=video_processor,
                                                  chat_template=tokenizer.chat_template)

    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "cv_ray_tiny.json").write_text(json.dumps({"family": family, "seed": seed, "spec": asdict(spec)}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def ensure_tiny_model(family: str, out_dir: str | os.PathLike, seed: int = 0, spec: TinySpec = TinySpec()) -> Path:
    """Return ``out_dir``, building the tiny model there first if it is not already present.

    A tiny model already there must be the one asked for (family, seed and sizes): a run must not go on
    with a model of other sizes without saying so.
    """
    out = Path(out_dir)
    marker = out / "cv_ray_tiny.json"
    if marker.exists():
        built = json.loads(marker.read_text())
        wanted = {"family": family, "seed": seed, "spec": asdict(spec)}
        if any(built.get(key, value) != value for key, value in wanted.items()):  # old markers: no spec
            raise ValueError(f"the tiny model at {out} was built as {built}, not {wanted}: remove that directory "
                             f"to rebuild it, or point model.path elsewhere")
        return out
    return build_tiny_model(family, out, seed=seed, spec=spec)
