import math

import pytest

from qtraj.schedules import Schedule, decayed_lr, lr_at, phase_at


def test_wsd_is_constant_then_decays_linearly_to_final_lr():
    schedule = Schedule("wsd", peak_lr=1.0, total_steps=100, warmup_steps=10, decay_fraction=0.3)
    assert schedule.decay_start == 70
    assert lr_at(schedule, 5) == pytest.approx(0.5)
    assert all(lr_at(schedule, step) == 1.0 for step in range(10, 71))
    assert lr_at(schedule, 85) == pytest.approx(0.5)
    assert lr_at(schedule, 100) == pytest.approx(0.0)
    assert [phase_at(schedule, s) for s in (10, 11, 70, 71, 100)] == ["warmup", "stable", "stable", "decay", "decay"]


def test_cosine_decays_right_after_warmup_to_final_fraction():
    schedule = Schedule("cosine", peak_lr=2.0, total_steps=100, warmup_steps=10, final_lr_fraction=0.1)
    lrs = [lr_at(schedule, step) for step in range(10, 101)]
    assert lrs[0] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] == pytest.approx(0.2)
    assert lr_at(schedule, 55) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert phase_at(schedule, 11) == "decay"


def test_constant_never_decays():
    schedule = Schedule("constant", peak_lr=1.0, total_steps=50, warmup_steps=0)
    assert {lr_at(schedule, step) for step in range(1, 51)} == {1.0}
    assert phase_at(schedule, 50) == "stable"


def test_unknown_kind_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="cosine, wsd, linear, constant"):
        Schedule("cosin", 1.0, 10, 0)


def test_wsd_with_a_1_sqrt_decay_falls_as_one_minus_the_root_of_progress_to_final_lr():
    schedule = Schedule("wsd", peak_lr=1.0, total_steps=100, warmup_steps=10, decay_fraction=0.3,
                        final_lr_fraction=0.1, decay_shape="1-sqrt")
    assert lr_at(schedule, 70) == 1.0  # the stable phase is untouched
    assert lr_at(schedule, 85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert lr_at(schedule, 100) == pytest.approx(0.1)
    linear = Schedule("wsd", 1.0, 100, 10, decay_fraction=0.3, final_lr_fraction=0.1)
    decay = range(71, 100)
    assert all(lr_at(schedule, step) < lr_at(linear, step) for step in decay)  # 1-sqrt falls faster early on
    lrs = [lr_at(schedule, step) for step in decay]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert [phase_at(schedule, s) for s in (70, 71)] == ["stable", "decay"]


def test_the_decay_shape_defaults_to_linear_so_existing_schedules_are_unchanged():
    implicit = Schedule("wsd", 3e-3, 800, 40, decay_fraction=0.25)
    explicit = Schedule("wsd", 3e-3, 800, 40, decay_fraction=0.25, decay_shape="linear")
    assert implicit.decay_shape == "linear"
    assert [lr_at(implicit, step) for step in range(1, 801)] == [lr_at(explicit, step) for step in range(1, 801)]
    assert decayed_lr(1.0, 0.0, 0.25, "1-sqrt") == pytest.approx(0.5)


def test_decay_shapes_are_checked_and_apply_to_wsd_only():
    with pytest.raises(ValueError, match="decay_shape 'sqrt' is unknown; known shapes: linear, 1-sqrt"):
        Schedule("wsd", 1.0, 10, 0, decay_shape="sqrt")
    with pytest.raises(ValueError, match="applies to a wsd schedule only, not to 'cosine'"):
        Schedule("cosine", 1.0, 10, 0, decay_shape="1-sqrt")
