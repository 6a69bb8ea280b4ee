"""Our checkpoints as :class:`pipeline.encoder.Encoder` objects (``load_encoder(RUN_DIR)``).

The model is rebuilt from the config stored in the checkpoint, its weights consolidated
from whatever ZeRO stage wrote them, and the eval preprocessing and tokenizer come from the
model's data contract. The returned model is the objective's ``model`` (for ALBEF the whole
ALBEF model, with its ITM head).
"""

from __future__ import annotations

import torch

from pipeline import config as config_io
from pipeline.encoder import LOADERS, Encoder
from train import checkpoint, parallel, tokenizers
from train.config import TrainConfig
from train.data import TRANSFORMS
from train.registry import MODELS, OBJECTIVES


def load_objective(spec: str) -> tuple[torch.nn.Module, TrainConfig]:
    """The trained objective (holding the model) of a run, checkpoints or step_* directory, on CPU."""
    import train.models  # noqa: F401  (fill the registries)
    import train.objectives  # noqa: F401

    folder, tag = checkpoint.resolve(spec)
    cfg = config_io.load(TrainConfig, f"{folder}/{tag}/config.yaml")
    objective = OBJECTIVES.build(cfg.objective.name, cfg.objective, MODELS.build(cfg.model.name, cfg.model))
    state = parallel.consolidated_state_dict(folder, tag)
    # Non-persistent buffers are rebuilt by the constructor; every saved key must match exactly.
    # Frozen parameters (momentum encoders) are not among the consolidated fp32 weights; the
    # returned objective is for its online model, so they stay as built.
    missing, unexpected = objective.load_state_dict(state, strict=False)
    frozen = {name for name, p in objective.named_parameters() if not p.requires_grad}
    persistent = set(objective.state_dict()) - frozen
    if unexpected or set(missing) & persistent:
        raise KeyError(f"checkpoint {folder}/{tag} does not match {cfg.model.name}: "
                       f"missing {sorted(set(missing) & persistent)}, unexpected {sorted(unexpected)}")
    return objective.eval(), cfg


@LOADERS.register("checkpoint")
def load(spec: str, device: str = "cpu") -> Encoder:
    objective, _ = load_objective(spec)
    model = objective.model.to(device)
    preprocess = TRANSFORMS.build("eval", None, model.contract)
    tokenize = tokenizers.build(model.contract)

    def tokenize_to_device(texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in tokenize(texts).items()}

    return Encoder(model=model, preprocess=lambda image: preprocess(image)["image"], tokenize=tokenize_to_device,
                   name=spec)
