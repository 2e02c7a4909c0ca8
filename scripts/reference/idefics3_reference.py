#!/usr/bin/env python3
"""Reference for the SmolVLM (Idefics3) architecture on generated weights, made with the
`transformers` implementation: a small Idefics3 model with seeded random weights, one image as
given `pixel_values` (so no image resizer is involved) and a prompt with its image tokens.

usage: idefics3_reference.py [--out-dir DIR] [--fixture PATH] [--seed 1234]

Writes
  models/tests/fixtures/idefics3_tiny/config.json         Idefics3Config (vision + text + connector)
  models/tests/fixtures/idefics3_tiny/model.safetensors   the weights, float32, as save_pretrained writes them
  models/tests/fixtures/idefics3_tiny/tokenizer.json      a word-level tokenizer over the 128 ids, with the
  models/tests/fixtures/idefics3_tiny/tokenizer_config.json  image tokens as special tokens and a ChatML
                                                          template (for serving the model in tests)
  models/tests/fixtures/idefics3_tiny_reference.json      pixel values, input ids, the connector's image
                                                          features and the logits of every position
  models/tests/fixtures/idefics3_preprocess_reference.json  the image processor (Idefics3ImageProcessorPil,
                                                          no image splitting) on two generated RGB images

The model is SmolVLM-256M's layout at a small size: a SigLIP vision transformer (32x32 images,
8x8 patches, so 16 patches; 2 layers of width 32), pixel shuffle with scale factor 2 (16 patches
-> 4 image tokens of width 128), the connector's projection to the text width, and a Llama text
model (2 layers, width 64, 4 heads over 2 key/value heads, vocabulary 128). The prompt is laid
out as Idefics3's processor lays out an image without splitting:
`<fake_token_around_image><global-img><image>*4<fake_token_around_image>` between text tokens
(token ids 120, 121, 122 here). Weights are drawn with initializer_range 0.2 (not the 0.02
default), so that every layer moves the logits by more than float noise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys

import numpy as np
import torch
from transformers import Idefics3Config, Idefics3ForConditionalGeneration
from transformers.models.idefics3 import Idefics3ImageProcessorPil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
IMAGE_TOKEN = 122
FAKE_AROUND = 120
GLOBAL_IMG = 121


def config() -> Idefics3Config:
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        initializer_range=0.2,
    )
    text = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=2,
        image_token_id=IMAGE_TOKEN,
        tie_word_embeddings=False,
    )


def preprocess_fixture(path: str) -> None:
    """Idefics3's image processor without splitting: the longest edge resized to
    `size.longest_edge` (aspect kept, Lanczos), then the image squared to `max_image_size`
    (Lanczos), rescaled by 1/255 and normalised with SmolVLM's mean and std (0.5). One image is
    enlarged on the way, one reduced."""
    processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": 64},
        max_image_size={"longest_edge": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    cases = []
    for width, height in [(20, 12), (96, 60)]:
        y, x = np.mgrid[0:height, 0:width]
        rgb = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x * 7 + y * 13) % 256)], -1)
        rgb = rgb.astype(np.uint8)
        out = processor(images=[[rgb]], return_tensors="np")["pixel_values"][0, 0]
        cases.append({
            "width": width,
            "height": height,
            "rgb": rgb.flatten().tolist(),
            "pixel_values_shape": list(out.shape),
            "pixel_values": out.flatten().tolist(),
        })
    fixture = {
        "made_with": {"transformers": importlib.metadata.version("transformers"),
                      "pillow": importlib.metadata.version("pillow")},
        "processor": {"size_longest_edge": 64, "max_image_size": 32, "rescale_factor": 1 / 255,
                      "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": "lanczos"},
        "cases": cases,
    }
    with open(path, "w") as f:
        json.dump(fixture, f)


SPECIALS = ["<fake_token_around_image>", "<global-img>", "<image>", "<|im_start|>", "<|im_end|>",
            "<end_of_utterance>"]


def write_tokenizer(out_dir: str) -> None:
    """Words w1..w119 and `user`/`assistant` as ids, the image and chat markers as special
    tokens at the ids the model's config uses (120-125), anything else [UNK] (0)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 120)}}
    vocab.update({name: 120 + i for i, name in enumerate(SPECIALS)})
    vocab.update({"user": 126, "assistant": 127})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIALS])
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    config = {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None,
              "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "models/tests/fixtures/idefics3_tiny"))
    ap.add_argument("--fixture", default=os.path.join(ROOT, "models/tests/fixtures/idefics3_tiny_reference.json"))
    ap.add_argument("--preprocess-fixture",
                    default=os.path.join(ROOT, "models/tests/fixtures/idefics3_preprocess_reference.json"))
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    preprocess_fixture(args.preprocess_fixture)

    torch.manual_seed(args.seed)
    model = Idefics3ForConditionalGeneration(config()).eval()
    model.save_pretrained(args.out_dir, safe_serialization=True)
    generation = os.path.join(args.out_dir, "generation_config.json")
    if os.path.exists(generation):
        os.remove(generation)  # not read by anything here
    write_tokenizer(args.out_dir)

    pixel_values = torch.rand(1, 1, 3, 32, 32) * 2 - 1  # already rescaled and normalised
    image = [FAKE_AROUND, GLOBAL_IMG] + [IMAGE_TOKEN] * 4 + [FAKE_AROUND]
    input_ids = torch.tensor([[1, 17, 33, 49] + image + [65, 81, 97]])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]

    fixture = {
        "made_with": {
            "transformers": importlib.metadata.version("transformers"),
            "torch": importlib.metadata.version("torch"),
            "seed": args.seed,
        },
        "image_token_id": IMAGE_TOKEN,
        "pixel_values_shape": list(pixel_values.shape[2:]),
        "pixel_values": pixel_values.flatten().tolist(),
        "input_ids": input_ids[0].tolist(),
        "image_features_shape": list(features.shape),
        "image_features": features.flatten().tolist(),
        "logits_shape": list(logits.shape),
        "logits": logits.flatten().tolist(),
    }
    with open(args.fixture, "w") as f:
        json.dump(fixture, f)
    print(f"wrote {args.out_dir} and {args.fixture}: features {tuple(features.shape)}, logits {tuple(logits.shape)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
