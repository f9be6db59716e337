"""One-shot merging: ``strategy=oneshot``, one exchange for sites that can afford one.

The run is one round of FedAvg's pattern (``strategies/fedavg.py``): the sources get ``train``
with the shared initial model (``strategy.init=shared``) or, with ``init=independent``, no
weights at all and a flag telling each to initialise from its own seed
(``OneShotSettings.own_init_seed``); each trains ``strategy.local_steps`` alone and replies once
(with its diagonal Fisher for the Fisher merges); the server merges once (``strategy.merge``:
the weighted average, ``FisherAggregator`` or ``PermutedFisherAggregator``). The target silo
evaluates the initial model in the train phase (round 0 of metrics.jsonl) and the merged model
in the final evaluate phase (round 1). ``rounds`` must be 1 (the preset sets it).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedalign.protocol import CONFIG
from strategies.fedavg import SiloFedAvg


class OneShot(SiloFedAvg):
    """FedAvg's round, once, whose sources may start from their own initialisations.

    Parameters are those of :class:`strategies.strategy.SiloStrategy`, with
    ``fedalign.settings.oneshot.OneShotSettings``.
    """

    def train_content(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> RecordDict:
        if self.settings.init == "independent":
            return RecordDict({CONFIG: config})  # no weights: each source seeds its own model
        return super().train_content(server_round, arrays, config)
