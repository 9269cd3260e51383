"""Healing's objective, checked against its formula written out per token (distillation.py):

    loss = alpha * T^2 * mean_{real tokens} KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE
"""

import math

import pytest
import torch

from modeling_sparse_gpt2.tooling.distillation import distillation_loss, freeze_all_but_ffn

from conftest import tiny_model


def by_hand(student, teacher, labels, temperature, alpha):
    kls, nll = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):  # position t predicts token t + 1
            if labels[b, t + 1] == -100:
                continue
            p = torch.softmax(teacher[b, t].double() / temperature, -1)
            q = torch.softmax(student[b, t].double() / temperature, -1)
            kls.append(float((p * (p.log() - q.log())).sum()))
            nll.append(-float(torch.log_softmax(student[b, t].double(), -1)[labels[b, t + 1]]))
    kl = sum(kls) / len(kls) * temperature**2
    ce = sum(nll) / len(nll)
    return alpha * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (2.0, 0.7), (3.0, 1.0), (0.5, 0.0)])
def test_distillation_loss_is_the_per_token_formula(temperature, alpha):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 7, 11, generator=g), 2 * torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[1, 4:] = -100  # padding: not scored in either term
    loss, kl, ce = distillation_loss(student, teacher, labels, temperature, alpha)
    want = by_hand(student, teacher, labels, temperature, alpha)
    for got, expected in zip((loss, kl, ce), want):
        assert got.item() == pytest.approx(expected, rel=1e-5)
    assert want[1] > 0.1 and want[2] > math.log(11) / 4  # premise: both terms matter


def test_freeze_all_but_ffn_leaves_exactly_the_ffn_parameters_trainable():
    model = tiny_model()
    n = freeze_all_but_ffn(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in name for name in trainable)
    assert n == sum(p.numel() for name, p in model.named_parameters() if ".mlp." in name)
