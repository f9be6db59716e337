"""Fisher merging after permutation weight matching (``oneshot``'s ``merge=fisher_permuted``).

Before the Fisher merge (``strategies/fisher.py``), every source model's hidden units are
reordered to match the reference model, the source with the most examples (the first by name
on a tie): weight matching on the parameters (Ainsworth et al., ICLR 2023), then the same
permutations applied to the model's BatchNorm statistics and to its Fisher, which is
per-parameter and so moves with its parameters. The math is in ``fedalign/permute.py``.
"""

from __future__ import annotations

import logging

import numpy as np

from fedalign.permute import apply_permutation, permutation_spec, weight_matching
from fedalign.settings.fisher import FisherSettings
from strategies.fisher import FisherAggregator

log = logging.getLogger("fedalign.strategy")


class PermutedFisherAggregator(FisherAggregator):
    """A Fisher merge of source models whose hidden units were first aligned to one of them.

    Parameters
    ----------
    settings : FisherSettings
        Floor, normalisation and silo weighting of the merge.
    parameter_names : set[str]
        The model's parameters; every other array (BatchNorm statistics) is averaged.
    model : str
        The model's name; it needs a permutation spec (``fedalign.permute.SPECS``).
    """

    def __init__(self, settings: FisherSettings, parameter_names: set[str], model: str) -> None:
        super().__init__(settings, parameter_names)
        self.model = model

    def merge(
        self,
        server_round: int,
        weights: list[dict[str, np.ndarray]],
        fishers: list[dict[str, np.ndarray]],
        counts: list[float],
        domains: list[str],
    ) -> dict[str, np.ndarray]:
        reference = int(np.argmax(counts))  # argmax keeps the first of equal counts
        spec = permutation_spec(self.model, weights[reference])
        parameters = [{n: w[n] for n in self.parameter_names} for w in weights]
        aligned_weights, aligned_fishers = [], []
        for i, (w, f) in enumerate(zip(weights, fishers, strict=True)):
            if i != reference:
                perms = weight_matching(spec, parameters[reference], parameters[i])
                w, f = apply_permutation(spec, perms, w), apply_permutation(spec, perms, f)
                log.info(
                    "round %d: %s's hidden units matched to %s's: %d of %d moved",
                    server_round,
                    domains[i],
                    domains[reference],
                    sum(int((p != np.arange(len(p))).sum()) for p in perms.values()),
                    sum(len(p) for p in perms.values()),
                )
            aligned_weights.append(w)
            aligned_fishers.append(f)
        return super().merge(server_round, aligned_weights, aligned_fishers, counts, domains)
