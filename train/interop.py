"""CLIP weights in other projects' layouts: open_clip's ``CLIP`` and Hugging Face's ``CLIPModel``.

Each layout is a pair of functions over state dicts, ``to_*(model, logit_scale) -> (config, state)``
and ``from_*(state) -> our state``, with the key mapping written once (:data:`_TEXT_BLOCK` and
friends) and run in either direction. Our CLIP's text tower is ``nn.TransformerEncoderLayer``
blocks (fused ``in_proj``); open_clip keeps the fused projection, Hugging Face splits it into q, k, v.

- open_clip: the image tower goes through open_clip's ``TimmModel`` (``visual.trunk`` is our timm
  tower, ``visual.head.proj`` our image projection). A tower built with extra timm arguments
  (``model.image_tower_args``) is described by a timm ``local-dir:`` folder next to the export
  (``timm/config.json``, which timm reads itself), since open_clip passes no timm arguments through.
- Hugging Face: only ViT towers in the OpenAI layout (class token, pre-norm, bias-free patch
  embedding, no layer scale, GELU or QuickGELU): :func:`hf_refusal` says why another tower is not.

The other way, :func:`initial_weights` reads an open_clip checkpoint (file or folder) or a Hugging
Face CLIP folder as our CLIP's state dict (``model.init_from``, fine-tuning). Nothing here imports
the model classes: it works on ``model.visual``, ``model.text`` and the state dicts, so the models
may import it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.config import ConfigError

# our text block suffix -> open_clip's (both fused q/k/v) and Hugging Face's
_TEXT_BLOCK_OPEN_CLIP = {
    "norm1": "ln_1", "norm2": "ln_2", "linear1": "mlp.c_fc", "linear2": "mlp.c_proj",
    "self_attn.in_proj_weight": "attn.in_proj_weight", "self_attn.in_proj_bias": "attn.in_proj_bias",
    "self_attn.out_proj": "attn.out_proj",
}
_TEXT_BLOCK_HF = {"norm1": "layer_norm1", "norm2": "layer_norm2", "linear1": "mlp.fc1", "linear2": "mlp.fc2",
                  "self_attn.out_proj": "self_attn.out_proj"}
_VIT_BLOCK_HF = {"norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                 "attn.proj": "self_attn.out_proj"}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if key == ours or key.startswith(ours + "."):
            return theirs + key[len(ours):]
    return None


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def logit_scale_of(objective: nn.Module) -> torch.Tensor:
    """The objective's learnt log logit scale (CLIP's temperature), or CLIP's initial log(1/0.07)."""
    scale = getattr(objective, "logit_scale", None)
    return scale.detach().float().reshape(()) if scale is not None else torch.tensor(math.log(1 / 0.07))


def initial_weights(source: str) -> dict[str, torch.Tensor]:
    """Our CLIP's state dict from ``model.init_from``: an open_clip checkpoint file or model folder, or a
    Hugging Face CLIP folder (``CLIPModel.save_pretrained``). Nothing is unpickled (weights-only loads)."""
    path = Path(source)
    if (path / "open_clip_config.json").is_file():
        files = [path / name for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
        if not any(f.is_file() for f in files):
            raise ConfigError(f"model.init_from: {source} has open_clip_config.json but no weights ({files[0].name})")
        return from_open_clip(_weights_file(next(f for f in files if f.is_file())))
    if (path / "config.json").is_file():
        from transformers import CLIPModel

        return from_hf(CLIPModel.from_pretrained(path, local_files_only=True).state_dict())
    if path.is_file():
        state = _weights_file(path)
        state = state.get("state_dict", state)  # open_clip's training checkpoints wrap it, keys prefixed "module."
        return from_open_clip({k.removeprefix("module."): v for k, v in state.items()})
    raise ConfigError(f"model.init_from: {source} is neither an open_clip checkpoint (file, or folder with "
                      "open_clip_config.json) nor a Hugging Face CLIP folder (config.json)")


def _weights_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- open_clip


def to_open_clip(model: nn.Module, cfg: Any, logit_scale: torch.Tensor, out: Path) -> tuple[dict, dict]:
    """(open_clip_config.json content, open_clip state dict) of our CLIP; may write ``out/timm/``."""
    contract = model.contract
    timm_name = cfg.image_tower
    if cfg.image_tower_args:  # open_clip's TimmModel passes no timm kwargs: timm reads them from a folder
        tower = Path(out, "timm").resolve()
        tower.mkdir(parents=True, exist_ok=True)
        pretrained_cfg = {k: v for k, v in model.visual.pretrained_cfg.items() if _is_json(v)}
        (tower / "config.json").write_text(json.dumps({
            "architecture": model.visual.pretrained_cfg.get("architecture", cfg.image_tower),
            "num_classes": 0, "model_args": cfg.image_tower_args, "pretrained_cfg": pretrained_cfg}, indent=2))
        timm_name = f"local-dir:{tower}"
    config = {
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "timm_proj_bias": False, "image_size": cfg.image_size},
            "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                         "heads": cfg.text_heads, "layers": cfg.text_layers, "mlp_ratio": 4.0},
        },
        "preprocess_cfg": {"size": cfg.image_size, "mean": list(contract.mean), "std": list(contract.std),
                           "interpolation": contract.interpolation, "resize_mode": "shortest"},
    }
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual."):
            state["visual.trunk." + key[len("visual."):]] = value
        elif key == "image_projection.weight":
            state["visual.head.proj.weight"] = value
        elif key == "text_projection.weight":
            state["text_projection"] = value.T.contiguous()  # open_clip: x @ P with P (W, D)
        elif key.startswith("text.blocks."):
            index, rest = key[len("text.blocks."):].split(".", 1)
            state[f"transformer.resblocks.{index}.{_rename(rest, _TEXT_BLOCK_OPEN_CLIP)}"] = value
        else:  # token_embedding, positional_embedding, ln_final
            state[key[len("text."):]] = value
    state["logit_scale"] = logit_scale.reshape(())
    return config, state


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP's state dict from an open_clip ``CLIP`` with a timm image tower (``visual.trunk``)."""
    ours, inverse = {}, _inverse(_TEXT_BLOCK_OPEN_CLIP)
    for key, value in state.items():
        if key.startswith("visual.trunk."):
            ours["visual." + key[len("visual.trunk."):]] = value
        elif key == "visual.head.proj.weight":
            ours["image_projection.weight"] = value
        elif key == "text_projection":
            ours["text_projection.weight"] = value.T.contiguous()
        elif key.startswith("transformer.resblocks."):
            index, rest = key[len("transformer.resblocks."):].split(".", 1)
            ours[f"text.blocks.{index}.{_rename(rest, inverse)}"] = value
        elif key in ("token_embedding.weight", "positional_embedding") or key.startswith("ln_final."):
            ours["text." + key] = value
        elif key != "logit_scale":
            raise KeyError(f"open_clip weight {key!r} has no place in this project's CLIP "
                           "(only timm image towers and the CLIP text transformer map)")
    return ours


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


# ---------------------------------------------------------------------------- Hugging Face


def hf_refusal(model: nn.Module, cfg: Any) -> str | None:
    """Why Hugging Face's CLIPModel cannot express ``model`` exactly (None when it can)."""
    from timm.layers import QuickGELU
    from timm.models.vision_transformer import VisionTransformer

    vit = model.visual
    if cfg.text_tower != "transformer":
        return "its text tower is a Hugging Face encoder, not CLIP's text transformer"
    if not isinstance(vit, VisionTransformer):
        return f"its image tower {cfg.image_tower} is not a ViT (CLIPModel's vision tower is a ViT)"
    block = vit.blocks[0]
    checks = {
        "a class token pooled at the output (global_pool 'token')": vit.cls_token is not None
        and vit.global_pool == "token" and vit.num_prefix_tokens == 1 and not getattr(vit, "no_embed_class", False),
        "a LayerNorm before the blocks (pre_norm)": isinstance(vit.norm_pre, nn.LayerNorm),
        "a bias-free patch embedding": vit.patch_embed.proj.bias is None,
        "a final LayerNorm and no fc_norm or attention pool": isinstance(vit.norm, nn.LayerNorm)
        and isinstance(vit.fc_norm, nn.Identity) and vit.attn_pool is None,
        "no layer scale, q/k norm or extra norms": all(isinstance(m, nn.Identity) for m in (
            block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm)),
        "q/k/v biases": block.attn.qkv.bias is not None,
        "GELU or QuickGELU": isinstance(block.mlp.act, (nn.GELU, QuickGELU))
        and getattr(block.mlp.act, "approximate", "none") == "none",
        "one LayerNorm eps": len({m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm)}) == 1,
    }
    missing = [what for what, ok in checks.items() if not ok]
    return f"its ViT {cfg.image_tower} lacks the OpenAI layout CLIPModel needs: {'; '.join(missing)}" if missing else None


def to_hf(model: nn.Module, cfg: Any, logit_scale: torch.Tensor) -> tuple[dict, dict]:
    """(transformers CLIPConfig kwargs, CLIPModel state dict) of an OpenAI-layout ViT CLIP."""
    from timm.layers import QuickGELU

    vit, block = model.visual, model.visual.blocks[0]
    eps = next(m.eps for m in vit.modules() if isinstance(m, nn.LayerNorm))
    config = {
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": float(logit_scale),
        "text_config": {"vocab_size": cfg.vocab_size, "hidden_size": cfg.text_width, "num_attention_heads": cfg.text_heads,
                        "num_hidden_layers": cfg.text_layers, "intermediate_size": 4 * cfg.text_width,
                        "max_position_embeddings": cfg.context_length, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                        "projection_dim": cfg.embed_dim, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        "vision_config": {"hidden_size": vit.embed_dim, "num_attention_heads": block.attn.num_heads,
                          "num_hidden_layers": len(vit.blocks), "intermediate_size": block.mlp.fc1.out_features,
                          "image_size": cfg.image_size, "patch_size": vit.patch_embed.patch_size[0],
                          "hidden_act": "quick_gelu" if isinstance(block.mlp.act, QuickGELU) else "gelu",
                          "layer_norm_eps": eps, "projection_dim": cfg.embed_dim},
    }
    state, width = {}, vit.embed_dim
    for key, value in model.state_dict().items():
        if key.startswith("visual.blocks."):
            index, rest = key[len("visual.blocks."):].split(".", 1)
            prefix = f"vision_model.encoder.layers.{index}."
            if rest.startswith("attn.qkv."):
                for name, part in zip("qkv", value.split(width)):
                    state[f"{prefix}self_attn.{name}_proj.{rest.rsplit('.', 1)[1]}"] = part
            else:
                state[prefix + _rename(rest, _VIT_BLOCK_HF)] = value
        elif key.startswith("text.blocks."):
            index, rest = key[len("text.blocks."):].split(".", 1)
            prefix = f"text_model.encoder.layers.{index}."
            if rest.startswith("self_attn.in_proj_"):
                for name, part in zip("qkv", value.split(cfg.text_width)):
                    state[f"{prefix}self_attn.{name}_proj.{rest.rsplit('_', 1)[1]}"] = part
            else:
                state[prefix + _rename(rest, _TEXT_BLOCK_HF)] = value
        else:
            state[_HF_SINGLE[key]] = _HF_RESHAPE.get(key, lambda v: v)(value)
    state["logit_scale"] = logit_scale.reshape(())
    return config, state


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP's state dict (OpenAI-layout timm ViT) from a transformers ``CLIPModel`` state dict."""
    ours, single = {}, {v: k for k, v in _HF_SINGLE.items()}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    vit_inverse, text_inverse = _inverse(_VIT_BLOCK_HF), _inverse(_TEXT_BLOCK_HF)
    for key, value in state.items():
        for tower, theirs, inverse, fused_name in (("visual", "vision_model", vit_inverse, "attn.qkv.{}"),
                                                   ("text", "text_model", text_inverse, "self_attn.in_proj_{}")):
            prefix = f"{theirs}.encoder.layers."
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                    kind = rest.rsplit(".", 1)[1]
                    fused.setdefault(f"{tower}.blocks.{index}.{fused_name.format(kind)}", {})[rest.split(".")[1][0]] = value
                else:
                    ours[f"{tower}.blocks.{index}.{_rename(rest, inverse)}"] = value
                break
        else:
            if key in single:
                ours[single[key]] = _HF_UNSHAPE.get(single[key], lambda v: v)(value)
            elif key not in ("logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"):
                raise KeyError(f"Hugging Face CLIP weight {key!r} has no place in this project's CLIP")
    for key, parts in fused.items():
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return ours


# Whole-tensor renames (ours -> Hugging Face) and the reshapes between the two layouts.
_HF_SINGLE = {
    "visual.cls_token": "vision_model.embeddings.class_embedding",
    "visual.pos_embed": "vision_model.embeddings.position_embedding.weight",
    "visual.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.norm_pre.weight": "vision_model.pre_layrnorm.weight", "visual.norm_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.norm.weight": "vision_model.post_layernorm.weight", "visual.norm.bias": "vision_model.post_layernorm.bias",
    "image_projection.weight": "visual_projection.weight",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight", "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection.weight": "text_projection.weight",
}
_HF_RESHAPE = {"visual.cls_token": lambda v: v.reshape(-1), "visual.pos_embed": lambda v: v.reshape(v.shape[-2:])}
_HF_UNSHAPE = {"visual.cls_token": lambda v: v.reshape(1, 1, -1), "visual.pos_embed": lambda v: v.unsqueeze(0)}
