"""The class-balanced loss, the EMA's decay ramp and the LR schedule on resume: pure logic,
checked against formulas computed by hand, without a training run."""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from training.imbalance import ClassBalancedLoss, class_balanced_weights
from training.schedule import (
    apply_schedule_lr,
    ema_decay_at,
    ema_too_short,
    warmup_cosine,
    warmup_cosine_factor,
)
from training.train import RampedEMA, build_criterion, describe_loss, warn_if_ema_too_short

COUNTS = [500, 100, 20, 5]
EPS = 0.1


def _hand_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Cui et al.: mean over the batch of w[y] * ((1 - eps) * -log p_y + eps * mean_c -log p_c)."""
    logp = logits.double().log_softmax(1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    smooth = -logp.mean(1)
    return (w.double()[y] * ((1 - eps) * nll + eps * smooth)).mean()


def _optimum(loss_fn, target: int, num_classes: int) -> torch.Tensor:
    """The softmax a single image's logits converge to under ``loss_fn``."""
    z = torch.zeros(1, num_classes, requires_grad=True)
    opt = torch.optim.SGD([z], lr=1.0)
    for _ in range(3000):
        opt.zero_grad()
        loss_fn(z, torch.tensor([target])).backward()
        opt.step()
    return z.detach().softmax(1)[0]


def test_class_balanced_loss_and_gradient_match_the_formula():
    w = class_balanced_weights(COUNTS, 0.999)
    assert w.sum().item() == pytest.approx(len(COUNTS))  # the paper's normalisation: sum C
    torch.manual_seed(0)
    logits = torch.randn(8, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 2, 3])
    ours_in = logits.clone().requires_grad_()
    ours = ClassBalancedLoss(w, EPS)(ours_in, y)
    hand_in = logits.clone().requires_grad_()
    hand = _hand_loss(hand_in, y, w, EPS)
    ours.backward()
    hand.backward()
    assert ours.item() == pytest.approx(hand.item(), rel=1e-6)
    torch.testing.assert_close(ours_in.grad, hand_in.grad, rtol=1e-5, atol=1e-7)


def test_a_class_without_training_images_does_not_scale_the_class_balanced_loss():
    """A class with no training image (all missing, unreadable or in the test split) gets weight
    0 and no part in the mean: the other classes keep the weights they have without it, so the
    loss of every real image stays as it was (it was ~0.3x when the empty class counted as n=1)."""
    with_empty = class_balanced_weights([COUNTS[0], 0, *COUNTS[1:], 0], 0.999)
    without = class_balanced_weights(COUNTS, 0.999)
    assert with_empty[1].item() == with_empty[-1].item() == 0.0
    present = torch.cat([with_empty[:1], with_empty[2:-1]])
    torch.testing.assert_close(present, without)
    assert present.mean().item() == pytest.approx(1.0)
    logits = torch.randn(8, len(with_empty))
    y = torch.tensor([0, 0, 0, 0, 2, 3, 4, 4])  # the images' classes: never an empty one
    got = ClassBalancedLoss(with_empty, EPS)(logits, y)
    per_sample = nn.functional.cross_entropy(logits, y, label_smoothing=EPS, reduction="none")
    assert got.item() == pytest.approx((without[[0, 0, 0, 0, 1, 2, 3, 3]] * per_sample).mean())
    assert class_balanced_weights([0, 0]).tolist() == [0.0, 0.0]  # no class to weight: no NaN


def test_a_batch_of_common_class_images_is_weighted_by_its_class_weight():
    w = class_balanced_weights(COUNTS, 0.999)
    logits = torch.randn(8, 4)
    y = torch.zeros(8, dtype=torch.long)
    plain = nn.functional.cross_entropy(logits, y, label_smoothing=EPS)
    ours = ClassBalancedLoss(w, EPS)(logits, y)
    assert w[0] < 0.1  # the head class is strongly down-weighted ...
    assert ours.item() == pytest.approx(w[0].item() * plain.item(), rel=1e-5)  # ... and stays so
    # torch's weighted mean divides by sum(w[y]), which cancels the weight of such a batch
    torch_weighted = nn.CrossEntropyLoss(weight=w)(logits, y)
    assert torch_weighted.item() == pytest.approx(
        nn.functional.cross_entropy(logits, y).item(), rel=1e-5
    )


def test_class_balanced_optimum_keeps_the_true_class():
    w = class_balanced_weights(COUNTS, 0.999)
    ours = _optimum(ClassBalancedLoss(w, EPS), 0, len(COUNTS))
    assert ours.argmax().item() == 0
    # one image's loss is w[y] times plain smoothed CE: same optimum, 1 - eps + eps / C on y
    assert ours[0].item() == pytest.approx(1 - EPS + EPS / len(COUNTS), abs=1e-3)
    assert ours[1:].tolist() == pytest.approx([EPS / len(COUNTS)] * 3, abs=1e-3)
    # the defect this replaces: per-class weights on the smoothing term pull a head-class image
    # towards the rarest class
    broken = _optimum(nn.CrossEntropyLoss(weight=w, label_smoothing=EPS), 0, len(COUNTS))
    assert broken.argmax().item() == 3


def test_build_criterion_and_the_recorded_loss():
    args = argparse.Namespace(imbalance="class-balanced", cb_beta=0.999, label_smoothing=EPS)
    crit = build_criterion(args, COUNTS)
    assert isinstance(crit, ClassBalancedLoss) and crit.label_smoothing == EPS
    torch.testing.assert_close(crit.weight, class_balanced_weights(COUNTS, 0.999))
    rec = describe_loss(crit)
    assert "w[y]" in rec["loss"] and "label_smoothing=0.1" in rec["loss"]
    weights = class_balanced_weights(COUNTS, 0.999).tolist()
    assert rec["class_weights"] == pytest.approx(weights, abs=1e-6)
    for mode in ("none", "weighted-sampler"):
        args.imbalance = mode
        crit = build_criterion(args, COUNTS)
        assert isinstance(crit, nn.CrossEntropyLoss) and crit.weight is None
        assert crit.label_smoothing == EPS
        assert "class_weights" not in describe_loss(crit)


def test_ema_decay_ramps_up_to_the_set_decay():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.5, 8) == 0.5  # a low decay is reached within a few updates
    ramp = [ema_decay_at(0.999, n) for n in range(10_000)]
    assert ramp == sorted(ramp)


def _scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_ramped_ema_follows_a_short_run_and_matches_the_recursion():
    decay, steps = 0.999, 42
    model = _scalar_model(0.0)
    ema = RampedEMA(model, decay)
    expected = None
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(step / steps)  # weights move from ~0 to 1 over the run
        ema.update_parameters(model)
        if expected is None:
            expected = step / steps  # the first update copies
        else:
            d = min(decay, (1 + step - 1) / (10 + step - 1))
            expected = d * expected + (1 - d) * step / steps
    got = ema.module.weight.item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert int(ema.n_averaged) == steps
    assert got > 0.75  # near the end of the run, not its start
    # without the ramp the EMA stays near the first step's weights (what the ramp fixes)
    flat = 1 / steps
    for step in range(2, steps + 1):
        flat = decay * flat + (1 - decay) * step / steps
    assert flat < 0.1


def test_ramped_ema_resumes_bit_identically():
    torch.manual_seed(0)
    values = torch.randn(20, 3, 3)
    model = nn.Linear(3, 3, bias=False)

    def run(ema: RampedEMA, chunk: torch.Tensor) -> None:
        for v in chunk:
            with torch.no_grad():
                model.weight.copy_(v)
            ema.update_parameters(model)

    straight = RampedEMA(model, 0.99)
    run(straight, values)
    first = RampedEMA(model, 0.99)
    run(first, values[:7])
    state, n = first.module.state_dict(), int(first.n_averaged)  # what the checkpoint stores
    resumed = RampedEMA(model, 0.99)
    resumed.module.load_state_dict(state)
    resumed.n_averaged.fill_(n)
    run(resumed, values[7:])
    assert torch.equal(straight.module.weight, resumed.module.weight)
    # a checkpoint whose count were lost (restarting the ramp) would not resume exactly
    restarted = RampedEMA(model, 0.99)
    restarted.module.load_state_dict(state)
    restarted.n_averaged.fill_(1)
    run(restarted, values[7:])
    assert not torch.equal(straight.module.weight, restarted.module.weight)


def test_short_runs_warn_about_the_ema(caplog):
    assert ema_too_short(0.999, 42)
    assert not ema_too_short(0.999, 7500)  # 30 epochs of CompCars at batch 64
    assert not ema_too_short(0.9, 60)
    assert not ema_too_short(0.0, 1)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        warn_if_ema_too_short(0.999, 42)
        warn_if_ema_too_short(0.999, 100_000)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--ema-decay 0.999" in warnings[0] and "42" in warnings[0]


def test_warmup_reaches_the_peak_once_then_decays():
    factors = [warmup_cosine_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 11)
    assert factors[9] == pytest.approx(10 / 11)
    assert factors.count(1.0) == 1 and factors[10] == 1.0
    assert factors[:11] == sorted(factors[:11]) and factors[10:] == sorted(factors[10:])[::-1]
    assert warmup_cosine_factor(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine_factor(0, 0, 100) == 1.0  # no warm-up: start at the peak


def _optimizer_and_schedule(total: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    model = nn.Linear(2, 2)
    groups = [{"params": [model.weight], "lr": 0.01}, {"params": [model.bias], "lr": 0.1}]
    optimizer = torch.optim.SGD(groups, lr=0.01)
    return optimizer, warmup_cosine(optimizer, 3, total)


def test_resume_with_more_epochs_starts_on_the_new_schedule():
    optimizer, scheduler = _optimizer_and_schedule(total=20)
    for _ in range(8):
        optimizer.step()
        scheduler.step()
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()

    optimizer, scheduler = _optimizer_and_schedule(total=40)  # --epochs doubled on resume
    optimizer.load_state_dict(saved_opt)
    scheduler.load_state_dict(saved_sched)
    stale = [g["lr"] for g in optimizer.param_groups]
    assert stale == pytest.approx([0.01 * warmup_cosine_factor(8, 3, 20), 0.1 * stale[0] / 0.01])
    apply_schedule_lr(scheduler)
    new = warmup_cosine_factor(8, 3, 40)
    assert not math.isclose(new, warmup_cosine_factor(8, 3, 20))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * new, 0.1 * new])
    assert scheduler.get_last_lr() == pytest.approx([0.01 * new, 0.1 * new])
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * warmup_cosine_factor(9, 3, 40))


def test_resume_with_the_same_schedule_keeps_the_lr_bit_for_bit():
    optimizer, scheduler = _optimizer_and_schedule(total=20)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    before = [g["lr"] for g in optimizer.param_groups]
    apply_schedule_lr(scheduler)
    assert [g["lr"] for g in optimizer.param_groups] == before  # exact, not approx
