"""Zero-shot image-text retrieval: recall@k both ways, several captions per image allowed.

Dual encoders (CLIP) rank by embedding similarity. Models with an ITM head (ALBEF, BLIP:
``image_tokens`` and ``itm_score``) follow the reference protocol: the top ``rerank_k``
candidates of each query by ITC similarity are rescored by the ITM head, scored by the ITM
logit (``itm``, ALBEF) or ITM logit + ITC similarity (``itm_plus_itc``, BLIP); the other
candidates keep their ITC order below every rescored one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch

from pipeline.evaluation import metrics, plots
from pipeline.evaluation.features import EvalContext, gather_rows
from pipeline.evaluation.task import TASKS, TaskConfig, TaskResult
from pipeline.core.log import progress
from train.gather import world


def rerank(
    sim: torch.Tensor, k: int, itm: Callable[[int, torch.Tensor], torch.Tensor], score: str
) -> torch.Tensor:
    """(Q, C) ITC similarities -> (Q, C) scores whose order differs from ``sim`` only in each row's top k.

    ``itm(q, candidates (k,)) -> (k,)`` is the ITM logit of query q with those candidates.
    Rows are split across ranks and gathered, as the similarity matrix is on every rank.
    """
    rank, world_size = world()
    k = min(k, sim.shape[1])
    rows = torch.arange(rank, sim.shape[0], world_size)
    out = []
    for q in progress(rows.tolist(), desc="ITM rerank"):
        top = sim[q].topk(k)
        rescored = itm(q, top.indices).float().cpu() + (top.values if score == "itm_plus_itc" else 0)
        # shift the rest below the lowest rescored entry, keeping their ITC order
        row = sim[q] - (sim[q].max() - rescored.min() + 1)
        row[top.indices] = rescored
        out.append(row)
    local = torch.stack(out) if out else sim.new_zeros((0, sim.shape[1]))
    return gather_rows(local, rows, sim.shape[0])


def captions_of(records: list[dict], dataset: str) -> tuple[list[str], torch.Tensor]:
    """All captions in order and (n_captions,) the image index each one belongs to."""
    if records and "captions" not in records[0]:
        raise ValueError(f"dataset {dataset!r} has no captions (retrieval needs them)")
    captions = [c for r in records for c in r["captions"]]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r["captions"]], dtype=torch.long)
    return captions, owner


@TASKS.register("retrieval")
class Retrieval:
    @dataclasses.dataclass(kw_only=True)
    class Config(TaskConfig):
        recall_at: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10])
        rerank_k: int = 128  # ITM rescoring of the top k (models with an ITM head; 0: ITC only)
        rerank_score: Literal["itm", "itm_plus_itc"] = "itm"
        curve_max_k: int = 50  # recall@k curve plotted for k = 1..curve_max_k

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, ctx: EvalContext) -> TaskResult:
        images = ctx.images()
        captions, owner = captions_of(images["records"], ctx.data.cfg.name)
        i2t = images["features"] @ ctx.text_features(captions).T  # (I, T) ITC similarity
        t2i = i2t.T
        reranked = hasattr(ctx.model, "itm_score") and self.cfg.rerank_k > 0
        if reranked:
            i2t, t2i = self._rerank(ctx, i2t, captions, images["tokens"])
        ranks = metrics.retrieval_ranks(i2t, t2i, owner)
        result = metrics.retrieval(ranks, tuple(self.cfg.recall_at))
        result["reranked_top_k"] = self.cfg.rerank_k if reranked else 0
        curves = {
            "image_to_text": metrics.recall_curve(ranks["image_to_text"], min(self.cfg.curve_max_k, i2t.shape[1])),
            "text_to_image": metrics.recall_curve(ranks["text_to_image"], min(self.cfg.curve_max_k, t2i.shape[1])),
        }
        return TaskResult(result, {"curves": curves})

    @torch.no_grad()
    def _rerank(
        self, ctx: EvalContext, sim: torch.Tensor, captions: list[str], tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, T) ITC similarity -> (I, T) image->text and (T, I) text->image reranked scores."""
        text = {k: v.cpu() for k, v in ctx.tokens(captions).items()}

        def pairs(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            with ctx.autocast():
                return ctx.model.itm_score(
                    tokens[image_idx].to(ctx.device),
                    text["input_ids"][text_idx].to(ctx.device),
                    text["attention_mask"][text_idx].to(ctx.device),
                )

        k, how = self.cfg.rerank_k, self.cfg.rerank_score
        i2t = rerank(sim, k, lambda q, texts: pairs(torch.full_like(texts, q), texts), how)
        t2i = rerank(sim.T, k, lambda q, imgs: pairs(imgs, torch.full_like(imgs, q)), how)
        return i2t, t2i

    def plot(self, result: TaskResult, prefix: str) -> list[str]:
        return [plots.recall_curves(result.details["curves"], f"{prefix}_recall_at_k.png")]
