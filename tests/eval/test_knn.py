import math

import torch
import torch.nn.functional as F

from dinoreg.eval.knn import extract_features, knn_accuracy, knn_predict


def test_weighted_votes_hand_computed():
    # bank: two class-0 points near the query, one class-1 point nearer than either
    bank = F.normalize(torch.tensor([[1.0, 0.2], [1.0, 0.3], [1.0, 0.0]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    query = F.normalize(torch.tensor([[1.0, 0.05]]), dim=-1)
    sims = query @ bank.T
    scores = knn_predict(bank, labels, query, k=3, temperature=0.07, num_classes=2)
    expected0 = math.exp(sims[0, 0] / 0.07) + math.exp(sims[0, 1] / 0.07)
    expected1 = math.exp(sims[0, 2] / 0.07)
    torch.testing.assert_close(scores, torch.tensor([[expected0, expected1]]))
    # with k=1 only the nearest (class 1) votes
    assert knn_predict(bank, labels, query, k=1, temperature=0.07, num_classes=2).argmax().item() == 1


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
    torch.testing.assert_close(knn_predict(feats, labels, queries, chunk_size=7), knn_predict(feats, labels, queries))


def test_extract_features_normalises():
    batches = [(torch.randn(3, 4) * 10, torch.tensor([0, 1, 2])), (torch.randn(2, 4), torch.tensor([1, 1]))]
    feats, labels = extract_features(lambda x: x * 2, batches)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5))
    assert labels.tolist() == [0, 1, 2, 1, 1]
