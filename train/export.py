"""Export a trained CLIP: ``python -m train.export RUN_DIR --to open_clip|hf --output OUT``.

- ``open_clip``: ``OUT/open_clip_config.json`` + ``OUT/open_clip_model.safetensors``, loaded by
  ``open_clip.create_model_and_transforms("local-dir:OUT")`` and ``open_clip.get_tokenizer("local-dir:OUT")``
  (and by this project as the curation scorer or evaluation model: ``open_clip:local-dir:OUT``).
  Every CLIP variant with CLIP's text transformer; the image tower runs in open_clip's TimmModel.
- ``hf``: a transformers ``CLIPModel`` + ``CLIPProcessor`` folder (``CLIPModel.from_pretrained(OUT)``),
  for ViT image towers in the OpenAI layout (``clip_vit_b32``, ``clip_vit_b16``, ``clip_vit_l14``);
  other towers (ResNets, ``clip_tiny``'s timm ViT with a patch bias and no pre-norm) are refused.

RUN_DIR is a run, checkpoints or ``step_*`` directory; the weights are the checkpoint's
consolidated ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.core.errors import UserError, run_command
from pipeline.core.registry import Registry
from train import interop
from train.encoder import load_objective

FORMATS: Registry = Registry("export format")


@FORMATS.register("open_clip")
def to_open_clip(model: nn.Module, cfg, logit_scale: torch.Tensor, out: Path) -> None:
    if cfg.text_tower != "transformer":
        raise UserError(f"cannot export {cfg.name} to open_clip: its text tower is a Hugging Face encoder "
                        "(model.text_tower: hf), which open_clip's HFTextEncoder pools and projects differently")
    out.mkdir(parents=True, exist_ok=True)
    config, state = interop.to_open_clip(model, cfg, logit_scale, out)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(state, out / "open_clip_model.safetensors")


@FORMATS.register("hf")
def to_hf(model: nn.Module, cfg, logit_scale: torch.Tensor, out: Path) -> None:
    reason = interop.hf_refusal(model, cfg)
    if reason:
        raise UserError(f"cannot export {cfg.name} to a Hugging Face CLIPModel: {reason}; use --to open_clip")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config, state = interop.to_hf(model, cfg, logit_scale)
    hf = CLIPModel(CLIPConfig(**config))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers the constructor fills
    if missing or unexpected:
        raise KeyError(f"Hugging Face CLIPModel layout mismatch: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(out)
    contract, size = model.contract, cfg.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(contract.mean), image_std=list(contract.std),
                                resample=3 if contract.interpolation == "bicubic" else 2)  # PIL BICUBIC / BILINEAR
    CLIPProcessor(image_processor=images, tokenizer=hf_tokenizer(cfg.context_length)).save_pretrained(out)


def hf_tokenizer(context_length: int):
    """Our CLIP BPE (open_clip's vocabulary and merges) as a transformers CLIPTokenizer."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    ours = SimpleTokenizer(context_length=context_length)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # Hugging Face's spelling
    vocab = {names.get(token, token): index for token, index in ours.encoder.items()}
    merges = [pair for pair, _ in sorted(ours.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def export(spec: str, to: str, out: str) -> None:
    objective, cfg = load_objective(spec)
    if not hasattr(cfg.model, "text_tower"):
        raise UserError(f"{spec} is a {cfg.model.name} run; only CLIP models export (to open_clip or hf)")
    FORMATS.build(to, objective.model, cfg.model, interop.logit_scale_of(objective), Path(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run, checkpoints or step_* directory")
    parser.add_argument("--to", required=True, choices=sorted(FORMATS.names()))
    parser.add_argument("--output", required=True, help="folder to write (created)")
    args = parser.parse_args(argv)
    export(args.run, args.to, args.output)
    return 0


if __name__ == "__main__":
    run_command(main)
