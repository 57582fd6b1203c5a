"""Choosing a request's next token from its logits: greedy, or sampled with its own seed.

Each request has its own `Sampler` (its parameters and a random generator seeded from the
request's `seed`), so what it draws does not depend on the requests beside it: the same
prompt, parameters and seed give the same tokens, alone or in any batch. Temperature 0 is
greedy: the first index of the largest logit, as keras-hub's GreedySampler picks.
"""

import numpy as np


class Sampler:
    """One request's token choice.

    Args:
        params: its `api.SamplingParams`.
        seed: the seed to use when `params.seed` is None (the engine draws one).
    """

    def __init__(self, params, seed):
        self.temperature = float(params.temperature)
        self.top_p = float(params.top_p)
        self.top_k = int(params.top_k or 0)
        self.rng = np.random.default_rng(params.seed if params.seed is not None else seed)

    def __call__(self, logits):
        """The next token id from a row of float32 logits."""
        logits = np.asarray(logits, np.float32)
        if self.temperature <= 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < kth, -np.inf, z)
        z -= np.max(z)
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cumulative = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cumulative, self.top_p) + 1)]
            mask = np.zeros_like(p, bool)
            mask[keep] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))
