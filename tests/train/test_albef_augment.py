"""ALBEF's pretraining augmentation in clip_train: crop, horizontal flip and RandAugment of ALBEF's ops,
drawn from the loader's per-sample seed (replay-exact) and visibly changing the images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core import config
from train.config import DataConfig, TrainConfig
from train.contract import DataContract
from train.data import _seed
from train.transforms import ALBEFRandAugment, TRANSFORMS

CONTRACT = DataContract(image_size=32)


def picture() -> Image.Image:
    """An asymmetric picture, so a flip, a shear or a rotation changes it."""
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[5:30, 3:12] = (250, 40, 40)
    pixels[25:38, 20:36] = (30, 200, 90)
    pixels[:, :, 2] = np.arange(40, dtype=np.uint8)[None] * 6
    return Image.fromarray(pixels)


def draw(cfg: DataConfig, position: int) -> torch.Tensor:
    """What the loader's decode stage does for the sample at ``position``: seed, then transform."""
    torch.default_generator.manual_seed(_seed(7, position) % 2**63)
    return TRANSFORMS.build("clip_train", cfg, CONTRACT)(picture())["image"]


def test_vit_b16_config_pretrains_with_albefs_augmentation():
    data = config.load(TrainConfig, "configs/albef/vit_b16.yaml").data
    assert (data.crop_scale, data.hflip, data.randaugment_ops, data.randaugment_magnitude) == ((0.2, 1.0), True, 2, 7)
    assert set(ALBEFRandAugment._AUGMENTATION_SPACE) == {
        "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
        "TranslateY", "Rotate"}  # ALBEF's RandomAugment(2, 7, augs=[...])


def test_flip_and_randaugment_are_seeded_per_sample_and_change_the_images():
    crop_only = DataConfig(path="x", crop_scale=(1.0, 1.0))  # full-image crop: only the new steps vary
    albef = DataConfig(path="x", crop_scale=(1.0, 1.0), hflip=True, randaugment_ops=2, randaugment_magnitude=7)
    plain = draw(crop_only, 0)
    views = [draw(albef, position) for position in range(16)]
    assert all(torch.equal(view, draw(albef, position)) for position, view in enumerate(views))  # replay-exact
    assert all(torch.equal(draw(crop_only, position), plain) for position in range(4))  # the crop alone: fixed
    changed = [not torch.equal(view, plain) for view in views]
    assert sum(changed) >= 12, changed  # identity twice (1/100) and no flip happens rarely
    assert len({view.numpy().tobytes() for view in views}) >= 12  # different samples, different draws
    flipped = [torch.equal(view, plain.flip(-1)) for view in [draw(DataConfig(path="x", crop_scale=(1.0, 1.0),
                                                                             hflip=True), p) for p in range(16)]]
    assert 3 <= sum(flipped) <= 13  # p = 0.5; the rest are the plain image
    assert all(v.dtype == torch.uint8 and v.shape == (3, 32, 32) for v in views)


@pytest.mark.parametrize("override", ["data.randaugment_ops=-1", "data.randaugment_magnitude=11"])
def test_randaugment_settings_are_checked(override):
    with pytest.raises(config.ConfigError, match="randaugment"):
        config.load(TrainConfig, "configs/albef/vit_b16.yaml", [override])
