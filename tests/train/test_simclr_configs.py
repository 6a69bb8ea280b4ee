"""SimCLR and MoCo configs load strictly and build; the SSL model's contract and BN conversion."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.core import config
from train.batchnorm import GlobalBatchNorm
from train.config import TrainConfig
from train.registry import MODELS, OBJECTIVES
from train.transforms import TRANSFORMS, to_model_input

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SSL_CONFIGS = sorted((CONFIGS / "simclr").glob("*.yaml")) + sorted((CONFIGS / "moco").glob("*.yaml"))


@pytest.mark.parametrize("path", SSL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_ssl_config_loads_strictly(path):
    cfg = config.load(TrainConfig, path)
    assert cfg.objective.name in ("simclr", "moco_v2") and not cfg.data.text
    assert config.from_dict(TrainConfig, config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["simclr", "moco_v2"])
def test_tiny_objective_trains_on_two_views_from_its_transform(name):
    cfg = config.load(TrainConfig, CONFIGS / ("simclr" if name == "simclr" else "moco") / "tiny.yaml")
    model = MODELS.build(cfg.model.name, cfg.model)
    assert model.contract.tokenizer == "" and model.contract.image_size == 32
    objective = OBJECTIVES.build(cfg.objective.name, cfg.objective, model)
    transform = TRANSFORMS.build(cfg.data.transform, cfg.data, model.contract)
    samples = [transform(Image.new("L", (28, 28), color=40 * i)) for i in range(4)]
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("view1", "view2")}
    batch = to_model_input(batch, model.contract, torch.float32)  # the trainer's step after the copy
    assert batch["view1"].shape == (4, 3, 32, 32) and not torch.equal(batch["view1"], batch["view2"])
    out = objective(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.head[0].weight.grad is not None
    assert model.encode_image(batch["view1"]).shape == (4, model.backbone.num_features)
    assert any(isinstance(m, GlobalBatchNorm) for m in model.modules()) == cfg.model.sync_bn
    assert issubclass(GlobalBatchNorm, torch.nn.SyncBatchNorm)  # on CUDA: SyncBatchNorm's fused kernels


def test_sync_bn_refuses_batchnorm_it_cannot_convert():
    cfg = MODELS.get("ssl").Config(backbone="efficientnet_b0", image_size=32, sync_bn=True)  # BatchNormAct2d
    with pytest.raises(ValueError, match="cannot synchronise BatchNormAct2d"):
        MODELS.build("ssl", cfg)


def test_moco_refuses_shuffle_bn_with_global_batchnorm():
    cfg = config.load(TrainConfig, CONFIGS / "moco" / "tiny.yaml", ["model.sync_bn=true"])
    model = MODELS.build(cfg.model.name, cfg.model)
    with pytest.raises(config.ConfigError, match=r"objective\.shuffle_bn and model\.sync_bn .* model\.sync_bn=false"):
        OBJECTIVES.build(cfg.objective.name, cfg.objective, model)
    OBJECTIVES.build(cfg.objective.name, config.load(TrainConfig, CONFIGS / "moco" / "tiny.yaml",
                                                     ["objective.shuffle_bn=false"]).objective, model)


def test_simclr_heads_have_global_batchnorm_on_their_layers_and_moco_heads_none():
    assert config.load(TrainConfig, CONFIGS / "simclr" / "resnet50.yaml").model.head_bn  # the paper's recipe
    for path in SSL_CONFIGS:
        cfg = config.load(TrainConfig, path, ["model.head_bn=true"] if path.parent.name == "simclr" else [])
        head = MODELS.build(cfg.model.name, cfg.model).head
        norms = [m for m in head if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        linears = [m for m in head if isinstance(m, torch.nn.Linear)]
        if cfg.objective.name == "simclr":  # SimCLR v1/v2 use_bn: BN after every linear layer, global with sync_bn
            assert len(norms) == len(linears) == cfg.model.head_layers
            assert all(isinstance(m, GlobalBatchNorm) for m in norms) and all(m.bias is None for m in linears)
            assert [m.affine for m in norms] == [True] * (len(norms) - 1) + [False]
        else:
            assert not norms and all(m.bias is not None for m in linears)
    cfg = config.load(TrainConfig, CONFIGS / "simclr" / "tiny.yaml", ["model.head_bn=true"])
    model = MODELS.build(cfg.model.name, cfg.model).train()
    projection = model(torch.randn(8, 3, 32, 32))  # the last BN normalises every output dimension over the batch
    torch.testing.assert_close(projection.mean(0), torch.zeros(cfg.model.head_dim), atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # resnet50.yaml's dtype: the head's BN runs under autocast
        projection = model(torch.randn(8, 3, 32, 32))
    projection.float().square().sum().backward()
    assert torch.isfinite(projection.float()).all() and torch.isfinite(model.head[0].weight.grad).all()
