"""Checks of ``rynnscale.models.generate`` shared by every model family's generation tests."""

from __future__ import annotations

import pytest

from rynnscale.models.generate import SamplingParams, generate


def check_seeded_sampling(model, prompts: list, params: SamplingParams) -> None:
    """Sampled generation of two prompts, 3 samples each, is reproducible from its seeds: the samples of one prompt
    differ, a sequence's draws depend on its own seed only (not on the rest of the batch), and top-k 1 is greedy."""
    seeds = [11, 12, 13, 21, 22, 23]
    a = generate(model, prompts, params, num_samples=3, seeds=seeds)
    assert generate(model, prompts, params, num_samples=3, seeds=seeds) == a
    assert len({tuple(x) for x in a}) == 6                       # samples of one prompt differ
    b = generate(model, prompts, params, num_samples=3, seeds=[11, 12, 99, 21, 22, 23])
    assert b[:2] == a[:2] and b[3:] == a[3:] and b[2] != a[2]    # a sequence's draws are its own seed's
    assert generate(model, [prompts[1]], params, seeds=[21]) == [a[3]]   # ... whatever else is in the batch
    greedy = generate(model, prompts, SamplingParams(params.max_new_tokens))
    assert generate(model, prompts, SamplingParams(params.max_new_tokens, temperature=0.8, top_k=1),
                    seeds=[5, 6]) == greedy                      # top-k 1 leaves one token: sampling is greedy
    with pytest.raises(ValueError, match="one seed per sequence"):
        generate(model, prompts, params, seeds=[1])
