"Retrieval and answer ranking: properties that any correct implementation has."
import pytest
import torch

from vlmrepro.core import VlmreproError
from vlmrepro.metrics.retrieval import answer_ranking, ndcg, retrieval_recall, target_ranks


def test_perfect_and_constant_scorers():
    n = 50
    sim = torch.eye(n) + 0.01 * torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    res = retrieval_recall(sim, torch.arange(n), ks=(1, 5))
    assert res["t2i_R@1"] == 100.0 and res["i2t_R@1"] == 100.0
    flat = retrieval_recall(torch.zeros(n, n), torch.arange(n), ks=(1, n))
    assert flat["t2i_R@1"] == 0.0 and flat["t2i_R@50"] == 100.0   # ties count against the query


def test_recall_is_invariant_to_candidate_order():
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(40, 40, generator=g); t = torch.arange(40)
    perm = torch.randperm(40, generator=g)
    a = retrieval_recall(sim, t, ks=(1, 5, 10))
    b = retrieval_recall(sim[:, perm], torch.argsort(perm)[t], ks=(1, 5, 10))
    assert a == b


def test_random_scores_give_chance_recall():
    g = torch.Generator().manual_seed(2)
    r = target_ranks(torch.randn(4000, 10, generator=g), torch.zeros(4000, dtype=torch.long))
    assert abs((r <= 1).double().mean().item() - 0.1) < 0.02


def test_visdial_answer_ranking():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(200, 100, generator=g); gt = torch.randint(0, 100, (200,), generator=g)
    scores[torch.arange(200), gt] = scores.max() + 1            # the model always prefers the right answer
    rel = torch.zeros(200, 100); rel[torch.arange(200), gt] = 1.0
    res = answer_ranking(scores, gt, rel)
    assert res["R@1"] == 100.0 and res["MRR"] == 100.0 and res["mean_rank"] == 1.0 and res["NDCG"] == 100.0
    assert ndcg(-scores, rel) < 10.0


@pytest.mark.parametrize("scores,targets,msg", [
    (torch.zeros(0, 3), [], "non-empty"),
    (torch.zeros(2, 3), [0, 3], "index the 3 candidates"),
    (torch.zeros(2, 3), [0], "one index per query"),
])
def test_bad_inputs(scores, targets, msg):
    with pytest.raises(VlmreproError, match=msg): target_ranks(scores, targets)
    with pytest.raises(VlmreproError, match="every image needs"): retrieval_recall(torch.zeros(2, 3), [0, 1])
