"""Sink metrics on constructed attention patterns."""

import numpy as np
import pytest

from attnjax.analysis import learned_sink_mass, sink_fraction, sink_heads, sink_mass

T = 37


def _uniform(batch=2, heads=3):
  return np.full((batch, heads, T, T), 1.0 / T)


def _all_to_first(batch=2, heads=3):
  weights = np.zeros((batch, heads, T, T))
  weights[..., 0] = 1.0
  return weights


def test_sink_mass_is_one_when_every_query_attends_the_first_token():
  masses = sink_mass({0: _all_to_first(), 1: _all_to_first()})
  for mass in masses.values():
    np.testing.assert_allclose(mass, 1.0)
  assert sink_fraction(masses) == 1.0


def test_sink_mass_is_one_over_length_for_uniform_attention():
  (mass,) = sink_mass({0: _uniform()}).values()
  np.testing.assert_allclose(mass, 1.0 / T)
  np.testing.assert_allclose(sink_mass({0: _uniform()}, num_sink_tokens=4)[0], 4.0 / T)
  assert sink_fraction({0: mass}) == 0.0


def test_sink_heads_and_fraction_count_heads_above_the_threshold():
  rng = np.random.default_rng(0)
  weights = rng.dirichlet(np.ones(T), size=(2, 4, T))  # random rows that sum to 1
  weights[:, 1] = _all_to_first(2, 1)[:, 0]  # head 1 of layer 0 is a sink head
  masses = sink_mass({0: weights, 1: _uniform(2, 4)})
  np.testing.assert_array_equal(sink_heads(masses)[0], [False, True, False, False])
  assert sink_fraction(masses) == pytest.approx(1 / 8)


def test_learned_sink_mass_is_the_share_missing_from_each_row():
  weights = 0.75 * _uniform()
  np.testing.assert_allclose(learned_sink_mass({0: weights})[0], 0.25)
  np.testing.assert_allclose(learned_sink_mass({0: _uniform()})[0], 0.0, atol=1e-12)


def test_sink_metrics_reject_bad_arguments():
  with pytest.raises(ValueError, match="maps"):
    sink_mass({})
  with pytest.raises(ValueError, match=r"maps\[0\]"):
    sink_mass({0: np.ones((T, T))})
  with pytest.raises(ValueError, match="num_sink_tokens"):
    sink_mass({0: _uniform()}, num_sink_tokens=T + 1)
  with pytest.raises(ValueError, match="skip_queries"):
    sink_mass({0: _uniform()}, skip_queries=T)
