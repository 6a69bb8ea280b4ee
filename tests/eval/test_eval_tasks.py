"""The tasks end to end on real files (WebDataset shards, an image folder) with hand-built models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval_data import write_shard
from eval_models import PALETTE, ProjectionWithOracleItm, palette_encoder, projection_encoder
from pipeline.core import config
from pipeline.evaluation import EvalConfig, run
from pipeline.evaluation.tasks.retrieval import rerank

COLOURS = list(PALETTE)


def _cfg(tmp_path, dataset: dict, tasks: list[dict], **top) -> EvalConfig:
    return config.from_dict(EvalConfig, {"output": str(tmp_path / "out"), "batch_size": 4, "dataset": dataset,
                                         "tasks": tasks, **top})


def test_oracle_zero_shot_on_an_image_folder_is_perfect(tmp_path, colour_folder):
    dataset = {"name": "image_folder", "root": str(colour_folder), "templates": ["a photo of {c}.", "{c}"]}
    [result] = run(_cfg(tmp_path, dataset, [{"name": "zeroshot_classification"}]), palette_encoder())
    # folder names (sorted) are the class names; the oracle reads the colour from pixels and words
    assert result["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    out = tmp_path / "out"
    saved = json.loads((out / "palette__image_folder__zeroshot_classification.json").read_text())
    assert saved["metrics"]["acc1"] == 1.0 and saved["config"]["dataset"]["root"] == str(colour_folder)
    assert (out / "palette__image_folder__zeroshot_classification_confusion.png").stat().st_size > 1000
    assert "| palette |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().startswith("model,step,dataset,task,")


def test_wrong_class_names_score_zero(tmp_path, colour_shards):
    # the shards' labels follow the palette order; rotating the names makes every answer wrong
    dataset = {"name": "wds", "urls": colour_shards, "classnames": COLOURS[1:] + COLOURS[:1]}
    [result] = run(_cfg(tmp_path, dataset, [{"name": "zeroshot_classification"}], plots=False), palette_encoder())
    assert result["metrics"]["acc1"] == 0.0


def test_retrieval_with_several_captions_per_image(tmp_path, colour_shards):
    dataset = {"name": "wds", "urls": colour_shards}
    [result] = run(_cfg(tmp_path, dataset, [{"name": "retrieval", "curve_max_k": 5}]), palette_encoder())
    m = result["metrics"]
    assert m["text_retrieval_recall@1"] == 1.0 and m["image_retrieval_recall@1"] == 1.0
    assert m["reranked_top_k"] == 0  # no ITM head: ITC only
    assert (tmp_path / "out" / "palette__wds__retrieval_recall_at_k.png").is_file()


def test_itm_rerank_rescues_a_wrong_itc_order(tmp_path, colour_shards):
    """An ALBEF-like model whose ITC is a random projection and whose ITM is exact: reranking the
    full candidate list reaches perfect recall, and k=0 keeps the (worse) ITC numbers."""
    encoder = projection_encoder()
    encoder.model = ProjectionWithOracleItm().eval()
    dataset = {"name": "wds", "urls": colour_shards}
    itc_only, reranked = (
        run(_cfg(tmp_path, dataset, [{"name": "retrieval", "rerank_k": k}], plots=False), encoder)[0]["metrics"]
        for k in (0, 64)
    )
    assert reranked["reranked_top_k"] == 64
    assert reranked["text_retrieval_recall@1"] == 1.0 and reranked["image_retrieval_recall@1"] == 1.0
    assert itc_only["mean_recall"] < 1.0


@pytest.mark.parametrize("score", ["itm", "itm_plus_itc"])
def test_rerank_changes_the_order_only_inside_the_top_k(score):
    torch.manual_seed(0)
    sim, k = torch.randn(7, 20), 5
    itm = torch.randn(7, 20)
    out = rerank(sim, k, lambda q, candidates: itm[q, candidates], score)
    for q in range(7):
        before, after = sim[q].argsort(descending=True), out[q].argsort(descending=True)
        assert set(after[:k].tolist()) == set(before[:k].tolist())  # the same k candidates on top
        assert after[k:].tolist() == before[k:].tolist()  # the rest keep their ITC order below them
        top = before[:k]
        expected = itm[q, top] + (sim[q, top] if score == "itm_plus_itc" else 0)
        assert after[:k].tolist() == top[expected.argsort(descending=True)].tolist()  # top k ordered by the new score
    assert not torch.equal(out.argsort(1, descending=True), sim.argsort(1, descending=True))


def test_linear_probe_separates_colours(tmp_path, colour_folder):
    dataset = {"name": "image_folder", "root": str(colour_folder)}
    task = {"name": "linear_probe", "train_fraction": 0.5, "val_fraction": 0.3}
    [result] = run(_cfg(tmp_path, dataset, [task]), projection_encoder())
    m = result["metrics"]
    assert m["lp_train_samples"] + m["lp_test_samples"] == 18
    assert m["lp_acc1"] > 0.5  # 6 classes: chance is 1/6
    assert m["lp_C"] > 0 and math.isnan(m["lp_acc5"]) is False


def test_classification_needs_labels_and_says_so(tmp_path, colour_shards):
    dataset = {"name": "wds", "urls": colour_shards, "label_key": "nope", "classnames": COLOURS}
    with pytest.raises(ValueError, match="has no class labels"):
        run(_cfg(tmp_path, dataset, [{"name": "zeroshot_classification"}]), palette_encoder())


def test_unknown_task_is_a_config_error():
    with pytest.raises(config.ConfigError, match="unknown eval task 'zeroshot'"):
        config.load(EvalConfig, "eval/fashion_mnist.yaml", ["tasks=[{name: zeroshot}]"])


@pytest.mark.parametrize("name", ["fashion_mnist", "linear_probe", "imagenet", "retrieval"])
def test_shipped_configs_load(name):
    overrides = {"imagenet": ["dataset.root=/data"], "retrieval": ["dataset.urls=/data/{0..1}.tar"]}.get(name, [])
    cfg = config.load(EvalConfig, f"eval/{name}.yaml", overrides)
    assert cfg.tasks


def test_imagenet_prompts_come_from_open_clip(tmp_path):
    from pipeline.evaluation.datasets import EvalSet

    (tmp_path / "n01440764").mkdir()
    cfg = config.load(EvalConfig, "eval/imagenet.yaml", [f"dataset.root={tmp_path}"])
    data = EvalSet(cfg.dataset)
    assert len(data.classnames) == 1000 and data.classnames[0] == "tench"
    assert len(data.templates) == 80 and all("{c}" in t for t in data.templates)


def test_a_corrupt_image_stops_with_its_name(tmp_path, colour_shards):
    write_shard(tmp_path / "bad.tar", [{"png": b"not a png", "txt": b"a red square", "cls": b"0"}])
    dataset = {"name": "wds", "urls": str(tmp_path / "bad.tar"), "classnames": COLOURS}
    with pytest.raises(ValueError, match=r"cannot decode the image of .*bad\.tar/000000"):
        run(_cfg(tmp_path, dataset, [{"name": "zeroshot_classification"}]), palette_encoder())


def test_report_merges_runs_into_one_table(tmp_path, colour_folder, colour_shards):
    from pipeline.evaluation import results_table

    folder = {"name": "image_folder", "root": str(colour_folder)}
    run(_cfg(tmp_path / "a", folder, [{"name": "zeroshot_classification"}], plots=False), palette_encoder())
    run(_cfg(tmp_path / "b", {"name": "wds", "urls": colour_shards}, [{"name": "retrieval"}], plots=False),
        projection_encoder())
    results_table.main([str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out"), "--output", str(tmp_path / "all")])
    lines = (tmp_path / "all.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["model", "step", "dataset", "task"] and "acc1" in header and "mean_recall" in header
    rows = {row.split(",")[0]: dict(zip(header, row.split(","))) for row in lines[1:]}
    assert rows["palette"]["acc1"] == "1" and rows["palette"]["mean_recall"] == ""
    assert rows["projection"]["task"] == "retrieval" and rows["projection"]["acc1"] == ""
    assert (tmp_path / "all.md").read_text().count("\n") == 4  # header, rule, two rows
