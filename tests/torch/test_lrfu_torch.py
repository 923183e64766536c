"""The torch LRFU decay gives one number per age, wherever the age sits in a tensor."""

from __future__ import annotations

import numpy as np
import torch

from memstore_torch import lrfu


def test_decay_is_the_same_number_at_any_position_and_matches_numpy():
    ages = torch.randint(0, 5000, (1001,))
    got = lrfu.decay(ages, 0.37)
    shuffled = torch.randperm(ages.numel())
    assert torch.equal(lrfu.decay(ages[shuffled], 0.37), got[shuffled])  # bit for bit
    assert torch.equal(lrfu.decay(ages[:7], 0.37), got[:7])  # other lengths, other tails
    np.testing.assert_allclose(got.numpy(), np.exp2(-0.37 * ages.numpy()), rtol=1e-15)


def test_ages_beyond_the_table_are_computed_too():
    ages = torch.tensor([0, 3, lrfu._TABLE_LIMIT + 5, 3])
    got = lrfu.decay(ages, 1e-6)
    want = [2.0 ** (-1e-6 * a) for a in ages.tolist()]
    assert got.tolist() == want
    assert lrfu.decay(torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0
