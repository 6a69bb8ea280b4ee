"""Every trainer config file loads strictly; typos and bad combinations fail before training."""

from pathlib import Path

import pytest
import torch

from pipeline.core import config
from pipeline.core.config import ConfigError
from train.config import ParallelConfig, TrainConfig
from train.parallel import deepspeed_config
from train.registry import MODELS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "clip").glob("*.yaml")), ids=lambda p: p.name)
def test_clip_config_loads_strictly(path):
    cfg = config.load(TrainConfig, path)
    assert cfg.model.name in MODELS and cfg.objective.name == "clip"
    assert type(cfg.model).__name__ == f"{cfg.model.name}_config"  # the variant's own schema
    round_trip = config.from_dict(TrainConfig, config.to_dict(cfg))
    assert round_trip == cfg


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.yaml")), ids=lambda p: p.name)
def test_deepspeed_section_loads_and_generates_json(path):
    parallel = config.load(ParallelConfig, path)
    ds = deepspeed_config(parallel, config.load(TrainConfig, CONFIGS / "clip" / "tiny.yaml").run, 8, world=4)
    assert ds["zero_optimization"]["stage"] == parallel.zero_stage
    assert ds["train_batch_size"] == 8 * parallel.grad_accum * 4


@pytest.mark.parametrize("override, message", [
    ("model.depht=3", "unknown key 'model.depht'"),
    ("model.text_layres=3", "did you mean 'model.text_layers'"),
    ("objective.chunk_size=-1", "chunk_size must be >= 0"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("run.epochs=2", "exactly one of run.steps and run.epochs"),
    ("model.name=clip_tnyi", "did you mean 'clip_tiny'"),
    ("run.run_dir=s3://bucket/runs/b32", "run.run_dir must be a local or mounted directory, not the URL s3://"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.load(TrainConfig, CONFIGS / "clip" / "tiny.yaml", [override])


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n.startswith("clip_tiny")])
def test_tiny_clip_variants_forward_and_backward(name):
    cfg = MODELS.get(name).Config()
    model = MODELS.build(name, cfg)
    ids = torch.randint(1, 1000, (2, cfg.context_length))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    image, text = model(torch.randn(2, 3, cfg.image_size, cfg.image_size), ids, mask)
    assert image.shape == text.shape == (2, cfg.embed_dim)
    (image.sum() + text.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_activation_checkpointing_recomputes_every_block_and_keeps_the_gradients():
    cfg = MODELS.get("clip_tiny").Config()
    ids = torch.randint(1, 1000, (2, cfg.context_length))
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MODELS.build("clip_tiny", cfg)
        model.set_grad_checkpointing(checkpointing)
        blocks = {f"{tower}.blocks.{i}": block for tower in ("visual", "text")
                  for i, block in enumerate(getattr(model, tower).blocks)}
        calls = dict.fromkeys(blocks, 0)
        for name, block in blocks.items():
            # A pre-hook: the recomputation stops early, once it has what backward needs (no post-hook then).
            block.register_forward_pre_hook(lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1))
        image, text = model(images, ids, torch.ones_like(ids))
        (image * text).sum().backward()
        # Checkpointing frees each block's activations after forward and runs the block again in backward.
        assert calls == dict.fromkeys(blocks, 2 if checkpointing else 1), (checkpointing, calls)
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)
