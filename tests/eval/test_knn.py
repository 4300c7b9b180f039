import math

import pytest
import torch
import torch.nn.functional as F

from dinoreg.metrics.knn import extract_features, knn_accuracy, knn_classify, vote_scores


def test_weighted_votes_hand_computed():
    # bank: two class-0 points near the query, one class-1 point nearer than either
    bank = F.normalize(torch.tensor([[1.0, 0.2], [1.0, 0.3], [1.0, 0.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    query = F.normalize(torch.tensor([[1.0, 0.05]]), dim=-1)
    sims = query @ bank.T
    scores = vote_scores(sims, labels[None], num_classes=2, temperature=0.07)
    expected0 = math.exp(sims[0, 0] / 0.07) + math.exp(sims[0, 1] / 0.07)
    expected1 = math.exp(sims[0, 2] / 0.07)
    torch.testing.assert_close(scores, torch.tensor([[expected0, expected1]]))
    # all three vote: class 0 wins on weight; with k=1 only the nearest (class 1) votes
    rows = knn_classify(bank, labels, query, torch.tensor([0]), ks=(3, 1), temperature=0.07)
    assert [row["top1"] for row in rows] == [1.0, 0.0]


def test_accuracy_on_separable_clusters_and_chunking():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(6, 16), dim=-1)
    labels = torch.arange(6).repeat(30)
    feats = F.normalize(centers[labels] + 0.05 * torch.randn(180, 16), dim=-1)
    queries = F.normalize(centers[labels[:60]] + 0.05 * torch.randn(60, 16), dim=-1)
    result = knn_accuracy(feats, labels, queries, labels[:60], k=5)
    assert result["knn_top1"] == 1.0 and result["knn_top5"] == 1.0
    shuffled = knn_accuracy(feats, labels[torch.randperm(180)], queries, labels[:60], k=5)
    assert shuffled["knn_top1"] < 0.6
    assert knn_classify(feats, labels, queries, labels[:60], chunk_size=7) == knn_classify(feats, labels, queries,
                                                                                             labels[:60])


def test_extract_features_normalises():
    batches = [(torch.randn(3, 4) * 10, torch.tensor([0, 1, 2])), (torch.randn(2, 4), torch.tensor([1, 1]))]
    feats, labels = extract_features(lambda x: x * 2, batches)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5))
    assert labels.tolist() == [0, 1, 2, 1, 1]


def _bank_with_similarities(similarities):
    """Unit vectors whose cosine with the query e0 is exactly each of ``similarities``."""
    n = len(similarities)
    bank = torch.zeros(n, n + 1)
    for i, cos in enumerate(similarities):
        bank[i, 0], bank[i, i + 1] = cos, math.sqrt(1 - cos * cos)
    query = torch.zeros(1, n + 1)
    query[0, 0] = 1.0
    return bank, query


def test_knn_classify_hand_computed_several_k():
    bank, query = _bank_with_similarities([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    bank_labels = torch.tensor([1, 2, 2, 3, 4, 5])
    queries = query.repeat(4, 1)
    query_labels = torch.tensor([2, 1, 5, 0])
    # T = 1: class 2 (e^.8 + e^.7 = 4.24) outvotes class 1 (e^.9 = 2.46) once both have voted.
    rows = knn_classify(bank, bank_labels, queries, query_labels, ks=(1, 3, 10), temperature=1.0, num_classes=7)
    by_k = {row["k"]: row for row in rows}
    # k=1: only class 1 votes -> top-1 and top-5 hit only the query labelled 1 (unvoted classes never count).
    assert by_k[1] == {"k": 1, "k_used": 1, "top1": 0.25, "top5": 0.25}
    # k=3: class 2 then class 1 -> top-1 hits label 2, top-5 labels 2 and 1.
    assert by_k[3] == {"k": 3, "k_used": 3, "top1": 0.25, "top5": 0.5}
    # k=10 > bank of 6: all vote; ranking 2 (4.24), 1 (2.46), 3 (1.82), 4 (1.65), 5 (1.49); class 0 never voted.
    assert by_k[10] == {"k": 10, "k_used": 6, "top1": 0.25, "top5": 0.75}
    expected = [math.exp(0.9), math.exp(0.8) + math.exp(0.7), math.exp(0.6), math.exp(0.5), math.exp(0.4)]
    sims = query @ bank.T  # [1, 6]
    scores = vote_scores(sims, bank_labels[None], num_classes=7, temperature=1.0)[0]
    torch.testing.assert_close(scores[1:6], torch.tensor(expected))
    # At T = 0.07 the nearest vote dominates: class 1 wins at every k.
    sharp = knn_classify(bank, bank_labels, queries, query_labels, ks=(3, 10), temperature=0.07, num_classes=7)
    assert [row["top1"] for row in sharp] == [0.25, 0.25]  # the query labelled 1


def _naive_knn(bank, bank_labels, queries, query_labels, k, temperature, num_classes):
    top1 = top5 = 0
    for query, label in zip(queries, query_labels):
        sims = [(float(query @ b), int(lab)) for b, lab in zip(bank, bank_labels)]
        sims.sort(key=lambda item: -item[0])
        scores = [0.0] * num_classes
        for sim, lab in sims[:k]:
            scores[lab] += math.exp(sim / temperature)
        true = scores[int(label)]
        higher = sum(score > true for score in scores)
        top1 += true > 0 and higher < 1
        top5 += true > 0 and higher < 5
    return top1 / len(queries), top5 / len(queries)


def test_knn_classify_matches_naive_loop_and_chunking():
    torch.manual_seed(1)
    bank = F.normalize(torch.randn(60, 8), dim=-1)
    bank_labels = torch.randint(0, 9, (60,))
    queries = F.normalize(torch.randn(25, 8), dim=-1)
    query_labels = torch.randint(0, 9, (25,))
    rows = knn_classify(bank, bank_labels, queries, query_labels, ks=(10, 20, 100), temperature=0.07,
                        num_classes=9, chunk_size=7)
    for row in rows:
        expected = _naive_knn(bank, bank_labels, queries, query_labels, row["k_used"], 0.07, 9)
        assert (row["top1"], row["top5"]) == pytest.approx(expected)
    assert [row["k_used"] for row in rows] == [10, 20, 60]
    # top-1 agrees with the training loop's knn_accuracy
    assert rows[1]["top1"] == pytest.approx(knn_accuracy(bank, bank_labels, queries, query_labels, k=20)["knn_top1"])


def test_knn_classify_rejects_empty_bank():
    with pytest.raises(ValueError, match="non-empty bank"):
        knn_classify(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.ones(1, 4), torch.zeros(1, dtype=torch.long))
