"""The margin head's logits on hand-picked vectors, its numerical safety at θ = 0 and π, and the margin warm-up."""
import math

import pytest
import torch

from pipeline.tasks.face.margin import EPS, MarginHead

S = 64.0


def _head(m1: float, m2: float, m3: float, warmup_steps: int = 0, s: float = S) -> MarginHead:
    """A head over 2-d embeddings whose class weights sit at the angles 0, π/2 and π."""
    head = MarginHead(2, 3, s, m1, m2, m3, warmup_steps=warmup_steps)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]]))  # norms do not matter
    return head


def _at(theta: float) -> torch.Tensor:
    return torch.tensor([[math.cos(theta), math.sin(theta)]]) * 5.0  # nor does the embedding's norm


@pytest.mark.parametrize("theta", [0.3, 1.0, 2.0])
def test_arcface_target_is_s_cos_theta_plus_m_and_others_s_cos_theta(theta):
    logits = _head(1.0, 0.5, 0.0)(_at(theta), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(S * math.cos(theta + 0.5), abs=1e-3)
    assert logits[0, 1].item() == pytest.approx(S * math.cos(math.pi / 2 - theta), abs=1e-3)
    assert logits[0, 2].item() == pytest.approx(S * math.cos(math.pi - theta), abs=1e-3)


def test_cosface_and_combined_margins():
    theta = 0.7
    cosface = _head(1.0, 0.0, 0.35)(_at(theta), torch.tensor([0]))
    assert cosface[0, 0].item() == pytest.approx(S * (math.cos(theta) - 0.35), abs=1e-3)
    combined = _head(1.2, 0.3, 0.2)(_at(theta), torch.tensor([1]))  # target: class 1, at π/2 - θ
    target = math.pi / 2 - theta
    assert combined[0, 1].item() == pytest.approx(S * (math.cos(1.2 * target + 0.3) - 0.2), abs=1e-3)
    assert combined[0, 0].item() == pytest.approx(S * math.cos(theta), abs=1e-3)


def test_past_pi_the_target_logit_keeps_falling():
    # θ + m > π: cos(θ + m) would rise again and reward a worse angle; the fallback is cos θ − m·sin m.
    head = _head(1.0, 0.5, 0.0)
    thetas = [2.5, 2.7, 2.9, 3.1]
    targets = [head(_at(t), torch.tensor([0]))[0, 0].item() for t in thetas]
    assert targets[-1] == pytest.approx(S * (math.cos(3.1) - 0.5 * math.sin(0.5)), abs=1e-3)
    assert all(a > b for a, b in zip(targets, targets[1:]))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("m", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.2, 0.3, 0.2)])
def test_no_nan_at_theta_zero_and_pi(autocast, m):
    head = _head(*m)
    # Class 0's weight exactly along the embedding (θ = 0), class 2's exactly against it (θ = π).
    embeddings = torch.tensor([[3.0, 0.0], [3.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(embeddings.to(torch.bfloat16) if autocast else embeddings, labels)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert logits.dtype == torch.float32  # the margin math ran in float32
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()
    assert logits[1, 2].item() <= S * (-1.0 + EPS)  # θ = π target logit: at or below s·cos π


def test_margin_warmup_ramps_from_zero_and_is_kept_in_the_state_dict():
    head = _head(1.0, 0.5, 0.0, warmup_steps=4)
    theta, labels = 0.6, torch.tensor([0])
    first = head(_at(theta), labels)[0, 0].item()
    assert first == pytest.approx(S * math.cos(theta), abs=1e-3)  # no margin yet
    for _ in range(2):
        head(_at(theta), labels)
    halfway = head(_at(theta), labels)[0, 0].item()  # the 4th step: 3/4 of the margin
    assert halfway == pytest.approx(S * math.cos(theta + 0.375), abs=1e-3)
    assert head.state_dict()["steps"].item() == 4
    full = head(_at(theta), labels)[0, 0].item()
    assert full == pytest.approx(S * math.cos(theta + 0.5), abs=1e-3)
    head.eval()
    head(_at(theta), labels)
    assert head.steps.item() == 5  # evaluation does not advance the warm-up
