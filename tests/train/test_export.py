"""A CLIP leaves in open_clip's and Hugging Face's formats and gives the same embeddings there;
CLIP_benchmark scores the export as ``pipeline.evaluate`` scores the run.

Random-init models are built in the test; the briefly trained ones are two short single-process
runs (a ViT in the OpenAI layout, clip_tiny's sizes, and clip_tiny_resnet) shared by the module.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.embedded import CLASSNAMES, fashion_mnist_test
from train import export, tokenizers
from train.encoder import load_encoder
from train.registry import MODELS
from train.transforms import TRANSFORMS

ROOT = Path(__file__).resolve().parents[2]
OPENAI_VIT = {"image_tower": "vit_base_patch32_clip_224"}  # clip_tiny's sizes, OpenAI layout (pre-norm, no patch bias)
TRAINED = {"vit": ("clip_tiny", OPENAI_VIT), "resnet": ("clip_tiny_resnet", {})}
CAPTIONS = ["a photo of a bag", "a black and white photo of a sneaker.", "an ankle boot " * 20]  # the last is cut


def _images(start: int, count: int) -> list[Image.Image]:
    images, _ = fashion_mnist_test()
    return [Image.fromarray(images[i]).convert("RGB") for i in range(start, start + count)]


def _ours(model: torch.nn.Module, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(pixels, image embeddings, tokens) of our model, unnormalised as encode_* returns them."""
    preprocess = TRANSFORMS.build("eval", None, model.contract)
    pixels = torch.stack([preprocess(image)["image"] for image in images])
    tokens = tokenizers.build(model.contract)(CAPTIONS)
    return pixels, model.encode_image(pixels), tokens


def _assert_open_clip_matches(model: torch.nn.Module, folder: Path, atol: float = 1e-5) -> None:
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    theirs.eval()
    images = _images(0, 4)
    with torch.no_grad():
        pixels, image, tokens = _ours(model, images)
        assert torch.allclose(torch.stack([preprocess(i) for i in images]), pixels, atol=1e-6)  # same preprocessing
        assert torch.equal(open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS), tokens["input_ids"])
        torch.testing.assert_close(theirs.encode_image(pixels), image, atol=atol, rtol=0)
        torch.testing.assert_close(theirs.encode_text(tokens["input_ids"]), model.encode_text(**tokens), atol=atol, rtol=0)


def _random_model(name: str, overrides: dict):
    torch.manual_seed(0)
    cfg = MODELS.config(name)(**overrides)
    return MODELS.build(name, cfg).eval(), cfg


@pytest.mark.parametrize("name, overrides", [
    ("clip_tiny", {}),  # timm ViT with tower args: described by a timm local-dir folder in the export
    ("clip_tiny", OPENAI_VIT),
    ("clip_tiny_resnet", {}),
    ("clip_tiny_resnet", {"image_tower_args": {}}),  # a plain timm name (full-width resnet18)
])
def test_random_init_export_to_open_clip_gives_our_embeddings(tmp_path, name, overrides):
    model, cfg = _random_model(name, overrides)
    export.to_open_clip(model, cfg, torch.tensor(2.5), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("open_clip_*")) == ["open_clip_config.json", "open_clip_model.safetensors"]
    _assert_open_clip_matches(model, tmp_path)


def _assert_hf_matches(model: torch.nn.Module, folder: Path, logit_scale: float, atol: float = 1e-4) -> None:
    from transformers import CLIPModel, CLIPProcessor

    hf, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels, image, tokens = _ours(model, _images(0, 4))
        text = processor(text=CAPTIONS, return_tensors="pt", padding=True, truncation=True)  # to the context length
        features = lambda out: getattr(out, "pooler_output", out)  # noqa: E731  (transformers 5 returns an output object)
        torch.testing.assert_close(features(hf.get_image_features(pixel_values=pixels)), image, atol=atol, rtol=0)
        torch.testing.assert_close(features(hf.get_text_features(**text)), model.encode_text(**tokens), atol=atol, rtol=0)
    assert hf.logit_scale.item() == pytest.approx(logit_scale)


def test_random_init_export_to_hf_gives_our_embeddings(tmp_path):
    model, cfg = _random_model("clip_tiny", OPENAI_VIT)
    export.to_hf(model, cfg, torch.tensor(2.5), tmp_path)
    _assert_hf_matches(model, tmp_path, 2.5)


@pytest.mark.parametrize("name, reason", [
    ("clip_tiny", "lacks the OpenAI layout CLIPModel needs: a LayerNorm before the blocks (pre_norm); a bias-free patch embedding"),
    ("clip_tiny_resnet", "its image tower resnet18 is not a ViT"),
])
def test_hf_export_refuses_what_clip_model_cannot_express(tmp_path, name, reason):
    model, cfg = _random_model(name, {})
    with pytest.raises(UserError, match=f"cannot export {name} to a Hugging Face CLIPModel: .*{re.escape(reason)}"):
        export.to_hf(model, cfg, torch.tensor(2.5), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source", ["open_clip folder", "open_clip checkpoint file", "hf folder"])
def test_init_from_starts_a_clip_from_open_clip_or_hf_weights(tmp_path, source):
    model, cfg = _random_model("clip_tiny", OPENAI_VIT)
    if source == "hf folder":
        export.to_hf(model, cfg, torch.tensor(2.5), tmp_path)
        path = tmp_path
    else:
        export.to_open_clip(model, cfg, torch.tensor(2.5), tmp_path)
        path = tmp_path
        if source == "open_clip checkpoint file":  # what open_clip's trainer saves (DDP-prefixed keys)
            theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
            path = tmp_path / "epoch_1.pt"
            torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    torch.manual_seed(1)  # another random init: every weight must come from the source
    started = MODELS.build("clip_tiny", MODELS.config("clip_tiny")(**OPENAI_VIT, init_from=str(path))).eval()
    theirs, state = started.state_dict(), model.state_dict()
    assert sorted(theirs) == sorted(state) and all(torch.equal(theirs[k], state[k]) for k in state)
    with torch.no_grad():
        pixels, image, tokens = _ours(model, _images(0, 2))
        assert torch.equal(started.encode_image(pixels), image)


def test_init_from_refuses_weights_of_another_architecture(tmp_path):
    model, cfg = _random_model("clip_tiny_resnet", {})
    export.to_open_clip(model, cfg, torch.tensor(2.5), tmp_path)
    with pytest.raises(UserError, match=f"model.init_from: {tmp_path} does not fit model clip_tiny as configured"):
        MODELS.build("clip_tiny", MODELS.config("clip_tiny")(init_from=str(tmp_path)))
    with pytest.raises(UserError, match="is neither an open_clip checkpoint"):
        MODELS.build("clip_tiny", MODELS.config("clip_tiny")(init_from=str(tmp_path / "missing")))


# ---------------------------------------------------------------------------- briefly trained runs


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def trained(fmnist_shards, tmp_path_factory):
    """``trained(kind) -> run dir`` of an 8-step single-process run of TRAINED[kind], launched once."""
    done = {}

    def get(kind: str) -> Path:
        if kind not in done:
            name, overrides = TRAINED[kind]
            run_dir = tmp_path_factory.mktemp(f"export_{kind}")
            proc = _run(["-m", "train.main", "--config", "configs/clip/tiny.yaml", f"model.name={name}",
                         *(f"model.{k}={v}" for k, v in overrides.items()), f"data.path={fmnist_shards}",
                         f"run.run_dir={run_dir}", "run.steps=8", "data.workers=0", "data.batch_size=32",
                         "schedule.warmup_steps=1", "optim.lr=2e-3", "log.tensorboard=false"], timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done[kind] = run_dir
        return done[kind]

    return get


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """``exported(kind, to) -> folder`` written by ``python -m train.export``, once per pair."""
    done = {}

    def get(kind: str, to: str) -> Path:
        if (kind, to) not in done:
            out = tmp_path_factory.mktemp(f"{kind}_{to}")
            proc = _run(["-m", "train.export", str(trained(kind)), "--to", to, "--output", str(out)], timeout=300)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done[kind, to] = out
        return done[kind, to]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_trained_export_to_open_clip_gives_our_embeddings(trained, exported, kind):
    ours = load_encoder(str(trained(kind)))
    init, _ = _random_model(*TRAINED[kind])
    assert not torch.equal(ours.model.image_projection.weight, init.image_projection.weight)  # it did train
    _assert_open_clip_matches(ours.model, exported(kind, "open_clip"))


@pytest.mark.slow
def test_trained_export_to_hf_gives_our_embeddings(trained, exported):
    from train.encoder import load_objective

    objective, _ = load_objective(str(trained("vit")))
    _assert_hf_matches(objective.model, exported("vit", "hf"), objective.logit_scale.item())


@pytest.mark.slow
def test_a_run_starts_from_an_open_clip_export(trained, exported, fmnist_shards, tmp_path):
    """model.init_from through the trainer (DeepSpeed wrap included): at lr 0 the run's weights stay
    the source's, so its embeddings are the source model's."""
    source = load_encoder(str(trained("vit")))
    proc = _run(["-m", "train.main", "--config", "configs/clip/tiny.yaml", "model.image_tower=vit_base_patch32_clip_224",
                 f"model.init_from={exported('vit', 'open_clip')}", f"data.path={fmnist_shards}",
                 f"run.run_dir={tmp_path}", "run.steps=2", "schedule.warmup_steps=1", "optim.lr=0", "data.workers=0",
                 "log.tensorboard=false"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    started = load_encoder(str(tmp_path))
    pixels = torch.stack([source.preprocess(image) for image in _images(0, 4)])
    torch.testing.assert_close(started.embed_images(pixels), source.embed_images(pixels), atol=1e-6, rtol=0)
    torch.testing.assert_close(started.embed_texts(CAPTIONS), source.embed_texts(CAPTIONS), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_export_command_refuses_in_one_line(trained, tmp_path):
    proc = _run(["-m", "train.export", str(trained("resnet")), "--to", "hf", "--output", str(tmp_path / "out")],
                timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: cannot export clip_tiny_resnet to a Hugging Face CLIPModel: its image tower resnet18 is not a ViT "
        "(CLIPModel's vision tower is a ViT); use --to open_clip"]


@pytest.mark.slow
def test_open_clip_export_is_a_curation_scorer(trained, exported):
    """The clip_score step loads its model with load_encoder: the folder (bare or open_clip:local-dir:)
    scores pairs as the run does."""
    ours = load_encoder(str(trained("vit")))
    folder = exported("vit", "open_clip")
    pixels = torch.stack([ours.preprocess(image) for image in _images(0, 4)])
    for spec in (str(folder), f"open_clip:local-dir:{folder}"):
        scorer = load_encoder(spec)
        torch.testing.assert_close(scorer.embed_images(torch.stack([scorer.preprocess(i) for i in _images(0, 4)])),
                                   ours.embed_images(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(scorer.embed_texts(CAPTIONS), ours.embed_texts(CAPTIONS), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- CLIP_benchmark parity

HELD_OUT = 1024  # the runs trained on the first 1024 test images


def _retrieval_shard(path: Path, count: int) -> list[tuple[Image.Image, list[str]]]:
    """Held-out Fashion-MNIST images with two captions each, unique per image (so no two captions tie)."""
    images, labels = fashion_mnist_test()
    samples = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(HELD_OUT, HELD_OUT + count):
            name = CLASSNAMES[labels[i]]
            captions = [f"a photo of a {name}, item {i}", f"item {i}: a {name}"]
            png = io.BytesIO()
            Image.fromarray(images[i]).save(png, format="PNG")
            sink.write({"__key__": f"{i:05d}", "png": png.getvalue(), "txt": "\n".join(captions)})
            samples.append((Image.fromarray(images[i]).convert("RGB"), captions))
    return samples


class _Labelled(list):
    """(image, label) pairs as CLIP_benchmark's classification reads a dataset (it asks for ``classes``)."""

    classes = CLASSNAMES


@pytest.mark.slow
def _accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy`` with ``.item()`` where it calls ``float()`` on a 1-element
    array, which numpy >= 2.4 refuses (TypeError); the computation is unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_clip_benchmark_scores_the_export_as_pipeline_evaluate_scores_the_run(trained, exported, tmp_path, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    if int(np.__version__.split(".")[0]) * 100 + int(np.__version__.split(".")[1]) >= 204:
        monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)

    run, folder, count = trained("vit"), exported("vit", "open_clip"), 500
    templates = ["a photo of a {c}.", "a black and white photo of a {c}."]
    ours = _run(["-m", "pipeline.evaluate", "--checkpoint", str(run), "--config", "eval/fashion_mnist.yaml",
                 "--output", str(tmp_path / "cls"), f"dataset.start={HELD_OUT}", f"dataset.limit={count}",
                 f"dataset.templates={json.dumps(templates)}", "tasks=[{name: zeroshot_classification}]"], timeout=300)
    assert ours.returncode == 0, ours.stderr[-4000:]
    samples = _retrieval_shard(tmp_path / "retrieval.tar", 200)
    ours_retrieval = _run(["-m", "pipeline.evaluate", "--checkpoint", str(run), "--config", "eval/retrieval.yaml",
                           "--output", str(tmp_path / "ret"), "dataset.urls=" + str(tmp_path / "retrieval.tar"),
                           "tasks=[{name: retrieval, recall_at: [1, 5, 10]}]"], timeout=300)
    assert ours_retrieval.returncode == 0, ours_retrieval.stderr[-4000:]
    [classification], [retrieval] = json.loads(ours.stdout), json.loads(ours_retrieval.stdout)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images, labels = fashion_mnist_test()
    held_out = _Labelled((preprocess(Image.fromarray(images[i]).convert("RGB")), int(labels[i]))
                         for i in range(HELD_OUT, HELD_OUT + count))
    loader = torch.utils.data.DataLoader(held_out, batch_size=128)
    theirs = zeroshot_classification.evaluate(model, loader, tokenizer, CLASSNAMES, templates, "cpu", amp=False)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert theirs[key] == pytest.approx(classification["metrics"][key], abs=1e-3), key
    pairs = [(preprocess(image), captions) for image, captions in samples]
    loader = torch.utils.data.DataLoader(pairs, batch_size=64, collate_fn=lambda b: (torch.stack([x for x, _ in b]),
                                                                                    [c for _, c in b]))
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        for direction in ("image_retrieval", "text_retrieval"):
            key = f"{direction}_recall@{k}"
            assert theirs[key] == pytest.approx(retrieval["metrics"][key], abs=1e-3), key
    # neither metric is at a bound, where agreement would say little (8 steps: near chance, not at it)
    assert 0 < classification["metrics"]["acc5"] < 1 and 0 < retrieval["metrics"]["image_retrieval_recall@10"] < 1
