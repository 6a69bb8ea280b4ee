"""Metrics on hand-built score matrices with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation import metrics


def test_perfect_classifier_scores_one():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 2])
    logits = torch.nn.functional.one_hot(labels, 6).float()
    assert metrics.classification(logits, labels) == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_shuffled_classifier_known_accuracies():
    # the true class is ranked 1st, 2nd, 3rd, 6th for the four images
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]] * 4)
    labels = torch.tensor([0, 1, 2, 5])
    m = metrics.classification(logits, labels)
    assert m["acc1"] == pytest.approx(1 / 4)
    assert m["acc5"] == pytest.approx(3 / 4)
    assert m["mean_per_class_recall"] == pytest.approx(1 / 4)  # 4 classes present, one right


def test_mean_per_class_recall_weighs_classes_not_images():
    labels = torch.tensor([0, 0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0.0]] * 5)  # always predicts class 0
    m = metrics.classification(logits, labels)
    assert m["acc1"] == pytest.approx(0.8)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert math.isnan(m["acc5"])  # fewer than 5 classes: reported as NaN, as CLIP_benchmark does


def test_ties_count_against_the_model():
    labels = torch.tensor([0, 1, 2])
    constant = torch.zeros((3, 6))
    m = metrics.classification(constant, labels)
    assert m["acc1"] == 0.0 and m["acc5"] == 0.0
    # a tie for first place with one other class is not a top-1 hit, but is top-2
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    assert metrics.rank_of_true(logits, torch.tensor([1])).item() == 1
    assert metrics.rank_of_true(logits, torch.tensor([2])).item() == 2


def test_retrieval_perfect_with_several_captions_per_image():
    owner = torch.tensor([0, 0, 1, 2, 2, 2])  # image 0 has 2 captions, image 2 has 3
    scores = (owner[None, :] == torch.arange(3)[:, None]).float()  # (3 images, 6 captions)
    m = metrics.retrieval(metrics.retrieval_ranks(scores, scores.T, owner))
    assert all(v == 1.0 for v in m.values())


def test_retrieval_image_found_by_its_best_caption():
    owner = torch.tensor([0, 0, 1, 1])
    # image 0: its second caption is ranked 1st; image 1: its captions are ranked 3rd and 4th
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.9, 0.8, 0.1, 0.0]])
    ranks = metrics.retrieval_ranks(scores, scores.T, owner)
    assert ranks["image_to_text"].tolist() == [0, 2]
    # text -> image (columns): only caption 1 scores its own image above the other one
    assert ranks["text_to_image"].tolist() == [1, 0, 1, 1]
    m = metrics.retrieval(ranks, ks=(1, 2))
    assert m["text_retrieval_recall@1"] == 0.5 and m["text_retrieval_recall@2"] == 0.5
    assert m["image_retrieval_recall@1"] == 0.25 and m["image_retrieval_recall@2"] == 1.0
    assert metrics.recall_curve(ranks["image_to_text"], 4) == [0.5, 0.5, 1.0, 1.0]


def test_retrieval_ties_count_against():
    owner = torch.tensor([0, 1])
    scores = torch.ones((2, 2))
    m = metrics.retrieval(metrics.retrieval_ranks(scores, scores.T, owner), ks=(1, 2))
    assert m["text_retrieval_recall@1"] == 0.0 and m["text_retrieval_recall@2"] == 1.0
