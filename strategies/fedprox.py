"""FedProx (Li et al., MLSys 2020) over domain silos.

Flower's own FedProx only sends ``proximal-mu``; here the sources also apply it: their local
loss adds ``mu / 2 * ||w - w_global||^2`` (``fedalign.train.train_local``). Aggregation is FedAvg.
"""

from __future__ import annotations

from fedalign.config import Silo
from fedalign.runlog import RunRecorder
from strategies.fedavg import SiloFedAvg


class FedProx(SiloFedAvg):
    """FedAvg whose sources train with a proximal term.

    Parameters
    ----------
    roster, recorder, num_rounds, min_sources
        As for :class:`SiloFedAvg`.
    proximal_mu : float (default: 0.01)
        Weight of the proximal term; 0 is FedAvg.
    """

    def __init__(
        self,
        roster: dict[int, Silo],
        recorder: RunRecorder,
        num_rounds: int,
        min_sources: int = 1,
        proximal_mu: float = 0.01,
    ) -> None:
        super().__init__(roster, recorder, num_rounds, min_sources)
        self.client_config = {"proximal-mu": float(proximal_mu)}
