"""Property tests: the loss is blind to unlabelled voxels (paper Sec. 3.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse3d.losses import MaskedCrossEntropy, balanced_class_weights

IGN = 3


def _case(seed=0, shape=(2, 3, 4, 5, 6), frac_labelled=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g)
    target = torch.randint(0, 3, (shape[0], *shape[2:]), generator=g)
    unl = torch.rand(target.shape, generator=g) > frac_labelled
    target[unl] = IGN
    return logits, target


def _loss_and_grad(loss_fn, logits, target):
    lg = logits.clone().requires_grad_(True)
    loss = loss_fn(lg, target)
    loss.backward()
    return loss.detach(), lg.grad


@pytest.mark.parametrize("weights", [None, (0.5, 2.0, 0.8)])
def test_blind_to_logits_at_unlabelled_voxels(weights):
    fn = MaskedCrossEntropy(3, IGN, weights)
    logits, target = _case()
    loss0, grad0 = _loss_and_grad(fn, logits, target)
    changed = logits.clone()
    unl = (target == IGN).unsqueeze(1).expand_as(changed)
    changed[unl] = torch.randn(int(unl.sum())) * 1e4  # anything, even huge
    changed[unl.nonzero()[:3].unbind(1)] = float("nan")  # even NaN
    loss1, grad1 = _loss_and_grad(fn, changed, target)
    assert torch.equal(loss0, loss1)
    assert torch.equal(grad0, grad1)
    assert torch.all(grad1[unl] == 0)


def test_equals_plain_cross_entropy_on_labelled_voxels():
    w = (0.5, 2.0, 0.8)
    logits, target = _case(1)
    fn = MaskedCrossEntropy(3, IGN, w)
    mask = target != IGN
    flat = logits.movedim(1, -1)[mask]
    ref = F.cross_entropy(flat, target[mask], weight=torch.tensor(w))
    assert torch.allclose(fn(logits, target), ref, atol=1e-6)
    ref_unweighted = F.cross_entropy(flat, target[mask])
    assert torch.allclose(MaskedCrossEntropy(3, IGN)(logits, target), ref_unweighted, atol=1e-6)


def test_scale_independent_of_unlabelled_count():
    logits, target = _case(2, shape=(1, 3, 4, 4, 4), frac_labelled=1.0)
    fn = MaskedCrossEntropy(3, IGN, (1.0, 3.0, 0.5))
    small = fn(logits, target)
    # embed the same labelled voxels in a volume 8x as big where everything else is unlabelled
    big_logits = torch.randn(1, 3, 8, 8, 8)
    big_target = torch.full((1, 8, 8, 8), IGN)
    big_logits[..., :4, :4, :4] = logits
    big_target[..., :4, :4, :4] = target
    assert torch.allclose(fn(big_logits, big_target), small, atol=1e-6)


def test_no_labelled_voxel_gives_zero_not_nan():
    fn = MaskedCrossEntropy(3, IGN, (1.0, 2.0, 3.0))
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    loss = fn(logits, torch.full((1, 4, 4, 4), IGN))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_target_centre_cropped_to_valid_logits():
    fn = MaskedCrossEntropy(3, IGN)
    logits, target = _case(3, shape=(1, 3, 2, 2, 2), frac_labelled=1.0)
    big_target = torch.full((1, 6, 6, 6), 0)
    big_target[:, 2:4, 2:4, 2:4] = target
    assert torch.allclose(fn(logits, big_target), fn(logits, target))


def test_bad_codes_rejected():
    fn = MaskedCrossEntropy(3, IGN)
    logits = torch.randn(1, 3, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    target[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        fn(logits, target)


def test_balanced_weights():
    # background 80 %, tubule 15 %, inside 5 % -> background reduced, inner tubule raised
    w = balanced_class_weights([50, 150, 800])
    assert w[0] > 1.0 > w[2] and w[0] > w[1] > w[2]
    assert pytest.approx(sum(w) / 3) == 1.0
    counts = [50, 150, 800]
    influence = [c * wi for c, wi in zip(counts, w, strict=True)]
    assert influence == pytest.approx([influence[0]] * 3)
    assert balanced_class_weights([0, 10, 30])[0] == 0.0
    with pytest.raises(ValueError):
        balanced_class_weights([0, 0, 0])


def test_square_root_balancing_lies_between_none_and_full():
    counts = [50, 150, 800]
    full, half, none = (balanced_class_weights(counts, p) for p in (1.0, 0.5, 0.0))
    assert none == pytest.approx((1.0, 1.0, 1.0))
    assert pytest.approx(sum(half) / 3) == 1.0
    # each ratio between two classes is the square root of the full ratio
    assert half[0] / half[2] == pytest.approx((full[0] / full[2]) ** 0.5)
    assert half[1] / half[2] == pytest.approx((full[1] / full[2]) ** 0.5)
    assert full[0] / full[2] > half[0] / half[2] > 1.0
    with pytest.raises(ValueError, match="power"):
        balanced_class_weights(counts, 1.5)
