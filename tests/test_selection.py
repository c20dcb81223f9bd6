"""Tests for jackpot_jax.core.selection on handmade epoch histories.

Golden values are computed by hand and written literally: on a 144-image split with the
best at 141 correct, the binomial SE is sqrt(141 * 3 / 144**3) = sqrt(423) / 1728 and one
image behind is 12 / sqrt(423) = 0.583460 SE.
"""

import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from jackpot_jax.core import selection as sel


def _history(values, metric='validation_top1', **columns):
    """Records for epochs 1, 2, ...: ``metric`` from ``values``, other keys from columns."""
    records = []
    for i, value in enumerate(values):
        record = {'epoch': i + 1, metric: value}
        for key, column in columns.items():
            record[key] = column[i]
        records.append(record)
    return records


def _of_144(*counts):
    return _history([c / 144 for c in counts])


# ----------------------------------------------------------------------------
# The standard error.
# ----------------------------------------------------------------------------
def test_binomial_standard_error_golden():
    assert sel.binomial_standard_error(141 / 144, 144) == pytest.approx(math.sqrt(423) / 1728)
    assert sel.binomial_standard_error(0.5, 100) == pytest.approx(0.05)
    assert sel.binomial_standard_error(0.872, 6000) == pytest.approx(0.00431309, abs=1e-8)
    # At p = 1 (and 143 of 144) the formula is below one example: one example it is.
    assert sel.binomial_standard_error(1.0, 144) == pytest.approx(1 / 144)
    assert sel.binomial_standard_error(143 / 144, 144) == pytest.approx(1 / 144)


# ----------------------------------------------------------------------------
# The rules.
# ----------------------------------------------------------------------------
def test_ties_keep_the_latest():
    records = _history([0.5, 0.7, 0.7, 0.6])
    assert sel.choose_epoch(records, rule='best').epoch == 3
    # No SE (no num_examples): the one-SE rule keeps the best, the latest on ties.
    choice = sel.choose_epoch(records)
    assert (choice.epoch, choice.best_epoch, choice.standard_error) == (3, 3, 0.0)
    assert choice.gap_in_standard_errors == 0.0


def test_float32_and_float64_of_one_count_tie():
    records = _history([140 / 144, float(np.float32(140 / 144)), 139 / 144])
    assert sel.choose_epoch(records, rule='best').epoch == 2


def test_float32_records_exactly_one_standard_error_behind_are_within():
    # float32 0.8 - 0.7 = 0.10000002 > 0.1: within one SE all the same.
    records = _history([float(np.float32(0.8)), float(np.float32(0.7))])
    assert sel.choose_epoch(records, standard_error=0.1).epoch == 2
    assert sel.choose_epoch(records, standard_error=0.0999).epoch == 1


def test_one_image_on_144_keeps_the_later_epoch():
    records = _of_144(139, 141, 140, 140)
    best = sel.choose_epoch(records, rule='best', num_examples=144)
    assert best.epoch == 2
    choice = sel.choose_epoch(records, num_examples=144)
    assert choice.rule == sel.DEFAULT_RULE == 'one_standard_error'
    assert choice.epoch == 4
    assert (choice.best_epoch, choice.best_value) == (2, 141 / 144)
    assert choice.value == 140 / 144
    assert choice.standard_error == pytest.approx(math.sqrt(423) / 1728)
    assert choice.gap_in_standard_errors == pytest.approx(0.583460, abs=1e-6)
    assert choice.considered == (1, 2, 3, 4)
    assert choice.describe() == (
        'epoch 4 (latest within one standard error of the best, 0.58 SE below '
        "epoch 2's 0.9792 on 144 validation examples; higher is better)"
    )


def test_two_images_on_144_are_more_than_one_standard_error():
    # 2 images = 24 / sqrt(423) = 1.1669 SE: the best is kept.
    choice = sel.choose_epoch(_of_144(141, 139), num_examples=144)
    assert choice.epoch == 1
    assert sel.choose_epoch(_of_144(141, 139), rule='last', num_examples=144).epoch == 2
    last = sel.choose_epoch(_of_144(141, 139), rule='last', num_examples=144)
    assert last.gap_in_standard_errors == pytest.approx(24 / math.sqrt(423))


def test_a_perfect_score_does_not_make_one_image_decide():
    # 144 of 144: the binomial SE is 0, the floor one image; 143 is exactly 1 SE behind.
    choice = sel.choose_epoch(_of_144(144, 143), num_examples=144)
    assert choice.epoch == 2
    assert choice.standard_error == pytest.approx(1 / 144)
    assert choice.gap_in_standard_errors == pytest.approx(1.0)
    assert sel.choose_epoch(_of_144(144, 142), num_examples=144).epoch == 1


def test_a_clear_early_best_is_kept():
    # 6,000 images: SE at 0.872 is 0.00431309; 0.8513 is 0.0207 / 0.00431309 = 4.7994 SE behind.
    records = _history([0.8720, 0.8513, 0.8513], mask_changes=[100, 50, 0])
    choice = sel.choose_epoch(records, num_examples=6000)
    assert (choice.epoch, choice.best_epoch) == (1, 1)
    assert choice.describe() == (
        'epoch 1 (latest within one standard error of the best: the best itself, 0.8720 '
        'on 6000 validation examples, SE 0.0043; higher is better)'
    )
    frozen = sel.choose_epoch(records, rule='best_frozen', num_examples=6000)
    assert frozen.epoch == 3
    assert frozen.considered == (2, 3)
    assert frozen.gap_in_standard_errors == pytest.approx(4.7994, abs=1e-4)


def test_best_frozen_and_final_mask_epochs():
    changes = [30, 20, 10, 0, 0]
    records = _history([0.80, 0.90, 0.85, 0.84, 0.84], mask_changes=changes)
    # Epoch 3 changed the masks last: epochs 3 to 5 were evaluated with the final masks.
    assert sel.final_mask_epochs(records) == (3, 4, 5)
    choice = sel.choose_epoch(records, rule='best_frozen')
    assert (choice.epoch, choice.best_epoch) == (3, 2)
    assert choice.describe() == (
        "epoch 3 (the best of the final-mask epochs 3 to 5, 0.0500 below epoch 2's 0.9000 "
        'in validation_top1; higher is better)'
    )
    assert choice.gap_in_standard_errors is None  # behind, with no SE
    # Per-layer counts are summed; masks that changed in the last epoch: the last alone.
    per_layer = _history([0.9, 0.8], mask_changes=[{'a': 0, 'b': 1}, {'a': 2, 'b': 0}])
    assert sel.final_mask_epochs(per_layer) == (2,)
    assert sel.choose_epoch(per_layer, rule='best_frozen').epoch == 2
    # Only the trailing counts are needed: from the last epoch that changed the masks on.
    partial = _history([0.9, 0.8, 0.85, 0.85], mask_changes=[None, 5, 0, 0])
    assert sel.final_mask_epochs(partial) == (2, 3, 4)
    with pytest.raises(ValueError, match=r"epoch 1's record has no 'mask_changes'"):
        sel.final_mask_epochs(_history([0.9, 0.8], mask_changes=[None, 0]))
    # Masks that never changed: every epoch holds them.
    assert sel.final_mask_epochs(_history([0.5, 0.6], mask_changes=[0, 0])) == (1, 2)


def test_last_rule():
    choice = sel.choose_epoch(_history([0.9, 0.8, 0.7]), rule='last')
    assert (choice.epoch, choice.value, choice.best_epoch) == (3, 0.7, 1)
    assert choice.considered == (3,)


def test_available_excludes_a_missing_checkpoint():
    records = _history([0.95, 0.97, 0.90, 0.93])
    # Epoch 2 (the best measured) was not kept; the last epoch always is.
    best = sel.choose_epoch(records, rule='best', available=[1, 3])
    assert (best.epoch, best.best_epoch, best.considered) == (1, 1, (1, 3, 4))
    # SE at 0.95 of 100: sqrt(0.0475) / 10 = 0.0217945; 0.93 is 0.917663 SE behind.
    choice = sel.choose_epoch(records, available=[1, 3], num_examples=100)
    assert choice.epoch == 4
    assert choice.standard_error == pytest.approx(0.0217945, abs=1e-7)
    assert choice.gap_in_standard_errors == pytest.approx(0.917663, abs=1e-6)
    # Without the restriction, epoch 2 is the best and 0.93 is beyond its SE (0.0170587).
    assert sel.choose_epoch(records, num_examples=100).epoch == 2
    # Only the last left: it is kept whatever the rule.
    for rule in sel.SELECTION_RULES:
        if rule != 'best_frozen':
            assert sel.choose_epoch(records, rule=rule, available=[]).epoch == 4


def test_lower_is_better_metric():
    losses = [0.50, 0.40, 0.41, 0.45]
    records = _history(losses, metric='validation_loss')
    kw = dict(metric='validation_loss', higher_is_better=False)
    # No SE: the binomial one does not apply to a loss, so the best (latest on ties).
    choice = sel.choose_epoch(records, **kw)
    assert (choice.epoch, choice.standard_error) == (2, 0.0)
    # An explicit SE of 0.02: the latest loss at most 0.42.
    choice = sel.choose_epoch(records, standard_error=0.02, **kw)
    assert choice.epoch == 3
    assert choice.gap_in_standard_errors == pytest.approx(0.5)
    assert choice.describe() == (
        'epoch 3 (latest within one standard error of the best, 0.50 SE above '
        "epoch 2's 0.4000 in validation_loss; lower is better)"
    )
    # The SE carried by the best record: 0.06, so up to 0.46.
    records[1]['validation_loss_stderr'] = 0.06
    choice = sel.choose_epoch(records, **kw)
    assert choice.epoch == 4
    assert choice.gap_in_standard_errors == pytest.approx(0.05 / 0.06)
    assert sel.choose_epoch(records, rule='best', **kw).epoch == 2


def test_error_rate_takes_the_binomial_standard_error():
    # An error rate is a fraction of examples too: 3 / 144 errors against 4 / 144.
    records = _history([3 / 144, 4 / 144], metric='validation_error')
    choice = sel.choose_epoch(
        records, metric='validation_error', higher_is_better=False, num_examples=144
    )
    assert choice.epoch == 2
    assert choice.gap_in_standard_errors == pytest.approx(12 / math.sqrt(423))


def test_record_order_does_not_matter():
    records = _of_144(139, 141, 140, 140, 138)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    for rule in ('best', 'one_standard_error', 'last'):
        assert (
            sel.choose_epoch(shuffled, rule=rule, num_examples=144)
            == sel.choose_epoch(records, rule=rule, num_examples=144)
        )


# ----------------------------------------------------------------------------
# Bad inputs.
# ----------------------------------------------------------------------------
def test_bad_inputs_name_the_value_and_the_fix():
    records = _of_144(140, 141)
    with pytest.raises(ValueError, match=r"rule='median' is unknown; choose one of \('best'"):
        sel.choose_epoch(records, rule='median')
    with pytest.raises(ValueError, match='records is empty'):
        sel.choose_epoch([])
    with pytest.raises(ValueError, match=r"epoch 2's record has no 'validation_top1'.*metric="):
        sel.choose_epoch([{'epoch': 1, 'validation_top1': 0.9}, {'epoch': 2, 'loss': 0.1}])
    with pytest.raises(ValueError, match=r'num_examples=0: .*integer >= 1'):
        sel.choose_epoch(records, num_examples=0)
    with pytest.raises(ValueError, match=r'num_examples=-5'):
        sel.choose_epoch(records, num_examples=-5)
    with pytest.raises(ValueError, match=r"epoch 1's validation_top1 is 97.5; pass fractions"):
        sel.choose_epoch(_history([97.5, 98.0]), num_examples=144)
    with pytest.raises(ValueError, match=r"epoch 2 appears twice"):
        sel.choose_epoch(records + [{'epoch': 2, 'validation_top1': 0.5}])
    with pytest.raises(ValueError, match=r"epoch 2's record has no 'mask_changes'.*'last'"):
        sel.choose_epoch(records, rule='best_frozen')
    with pytest.raises(ValueError, match=r"needs an 'epoch' key"):
        sel.choose_epoch([{'validation_top1': 0.5}])
    with pytest.raises(ValueError, match=r"epoch 1's validation_top1 is nan"):
        sel.choose_epoch(_history([float('nan'), 0.5]))
    with pytest.raises(ValueError, match=r'standard_error=-0.1'):
        sel.choose_epoch(records, standard_error=-0.1)


def test_the_module_imports_no_jax():
    path = os.path.join(os.path.dirname(__file__), '..', 'jackpot_jax', 'core', 'selection.py')
    code = (
        'import importlib.util, sys\n'
        f'spec = importlib.util.spec_from_file_location("selection", {path!r})\n'
        'module = sys.modules["selection"] = importlib.util.module_from_spec(spec)\n'
        'spec.loader.exec_module(module)\n'
        'assert not [m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "jackpot_jax")]\n'
    )
    subprocess.run([sys.executable, '-c', code], check=True)
