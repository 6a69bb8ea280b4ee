"""Several captions per image (COCO-style shards: one tar sample per pair, the image named in its .json):
pairs of one image are never each other's negatives, in CLIP's loss, ALBEF's ITC and ALBEF's ITM draws."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

import train.objectives.albef as albef_objective
from pipeline.embedded import fashion_mnist_test
from train.config import DataConfig
from train.data import TrainLoader, sample_id
from train.objectives.clip import clip_loss
from train.registry import MODELS, OBJECTIVES
from train.transforms import to_model_input

IMAGES, CAPTIONS_PER_IMAGE, BATCH = 8, 5, 20


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory):
    """2 tars of 8 Fashion-MNIST images x 5 captions, one sample per pair (``uid`` key, ``.json``
    naming the image), plus one pair whose .json lacks the image id."""
    out = tmp_path_factory.mktemp("coco")
    images, _ = fashion_mnist_test()
    sizes = {}
    for shard in range(2):
        name, count = f"{shard:06d}.tar", 0
        with wds.TarWriter(str(out / name)) as sink:
            for image in range(shard, IMAGES, 2):
                jpeg = io.BytesIO()
                Image.fromarray(images[image]).convert("RGB").save(jpeg, format="JPEG")
                for caption in range(CAPTIONS_PER_IMAGE):
                    sink.write({"__key__": f"uid{image:03d}{caption}", "jpg": jpeg.getvalue(),
                                "txt": f"caption {caption} of picture {image}",
                                "json": json.dumps({"uid": f"uid{image:03d}{caption}", "image_id": image})})
                    count += 1
            if shard == 1:
                sink.write({"__key__": "orphan", "jpg": jpeg.getvalue(), "txt": "no id", "json": json.dumps({})})
                count += 1
        sizes[name] = count
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def first_batch(shards, contract, image_id_key="image_id", batch_size=BATCH):
    cfg = DataConfig(path=str(shards), batch_size=batch_size, workers=0, shuffle_buffer=41, image_id_key=image_id_key)
    loader = TrainLoader(cfg, contract, rank=0, world=1, seed=0)
    batch = next(iter(loader))
    return batch, loader


def test_loader_carries_the_image_id_from_the_json_and_counts_pairs_without_one(coco_shards):
    model = MODELS.build("clip_tiny", MODELS.get("clip_tiny").Config())
    cfg = DataConfig(path=str(coco_shards), batch_size=BATCH, workers=0, shuffle_buffer=8, image_id_key="image_id")
    loader = TrainLoader(cfg, model.contract, rank=0, world=1, seed=0)
    stream = iter(loader)
    ids, pairs = [], []
    for _ in range(loader.batches_per_epoch):  # 2 batches of 20: all 41 samples read, and a few of the next pass
        batch = next(stream)
        ids += batch["image_id"].tolist()
        pairs += batch["sample_id"].tolist()
    assert set(ids) == {sample_id(str(i)) for i in range(IMAGES)}  # 8 images named by the .json
    assert len(set(pairs)) > IMAGES  # sample_id still names the pair
    assert loader.skipped()["missing_image_id"] == 1
    default, _ = first_batch(coco_shards, model.contract, image_id_key="")  # every pair its own image
    assert torch.equal(default["image_id"], default["sample_id"])


def masked_reference(image, text, scale, same_image):
    """CLIP's loss written out on the full logits, same-image pairs other than the positive set to -inf."""
    logits = scale * image @ text.T
    off_positive = same_image & ~torch.eye(len(image), dtype=torch.bool)
    target = torch.arange(len(image))
    return (F.cross_entropy(logits.masked_fill(off_positive, -torch.inf), target)
            + F.cross_entropy(logits.T.masked_fill(off_positive, -torch.inf), target)) / 2


@pytest.mark.parametrize("chunk", [0, 3])
def test_clip_loss_leaves_other_captions_of_the_image_out_of_the_softmax(coco_shards, chunk):
    model = MODELS.build("clip_tiny", MODELS.get("clip_tiny").Config())
    batch, _ = first_batch(coco_shards, model.contract)
    ids = batch["image_id"]
    same_image = ids[:, None] == ids[None]
    assert (same_image.sum(1) > 1).all()  # every pair has another caption of its image in the batch
    objective = OBJECTIVES.build("clip", OBJECTIVES.get("clip").Config(chunk_size=chunk), model)
    features = objective.features(to_model_input(batch, model.contract, torch.float32))
    scale = objective.logit_scale.detach().exp()
    loss = objective.loss(features, owns_parameters=True)["loss"]
    expected = masked_reference(features["image"].detach(), features["text"].detach(), scale, same_image)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    unmasked = clip_loss(features["image"], features["text"], objective.logit_scale.detach(), chunk)
    assert (unmasked - loss).abs() > 1e-3  # the mask changes the loss: 4 of 19 negatives were the same image


def test_albef_never_treats_captions_of_one_image_as_negatives(coco_shards, monkeypatch):
    torch.manual_seed(0)
    model = MODELS.build("albef_tiny", MODELS.get("albef_tiny").Config())
    objective = OBJECTIVES.build("albef", OBJECTIVES.get("albef").Config(queue_size=BATCH, alpha=0.0), model)
    batch, _ = first_batch(coco_shards, model.contract)
    batch = to_model_input(batch, model.contract, torch.float32)
    ids = batch["image_id"]
    draws = []

    def recorded(similarity, same_id, generator=None):  # the real draw, its result kept
        draws.append(hard_negatives(similarity, same_id, generator))
        return draws[-1]

    hard_negatives = albef_objective.hard_negatives
    monkeypatch.setattr(albef_objective, "hard_negatives", recorded)
    for step in range(3):
        objective.start_step(step, 100)
        objective(batch)
    assert len(draws) == 6  # an image->text and a text->image draw per step
    for index, valid in draws:
        assert valid.all()  # every pair has candidates of other images
        assert (ids[index] != ids).all(), (ids[index] == ids).sum()
    # ITC (alpha 0): the targets of a row spread over every key of its image, in the batch and the queue
    # (the queue now holds this same batch's momentum keys).
    feats = [F.normalize(torch.randn(BATCH, model.image_projection.out_features), dim=-1) for _ in range(4)]
    temperature = objective.temperature.detach().float()
    itc = objective.contrastive_loss(*feats, ids, temperature)
    keys_ids = torch.cat([ids, objective.queue.get("id")])
    targets = (ids[:, None] == keys_ids[None]).float()
    targets /= targets.sum(1, keepdim=True)
    image_keys = torch.cat([feats[2], objective.queue.get("image")])
    text_keys = torch.cat([feats[3], objective.queue.get("text")])
    expected = (-(F.log_softmax(feats[0] @ text_keys.T / temperature, 1) * targets).sum(1).mean()
                - (F.log_softmax(feats[1] @ image_keys.T / temperature, 1) * targets).sum(1).mean()) / 2
    torch.testing.assert_close(itc, expected, rtol=1e-5, atol=1e-5)
