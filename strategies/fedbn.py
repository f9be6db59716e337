"""FedBN (Li et al., ICLR 2021) over domain silos.

Each source keeps its own BatchNorm weights and running statistics across rounds: it puts them
into every global model it receives (before evaluating and training) and stores them again after
training. The server averages all arrays as FedAvg does; the averaged BatchNorm entries are what
the target silo, which has no BatchNorm state of its own, evaluates with.
"""

from __future__ import annotations

from fedalign.config import Silo
from fedalign.runlog import RunRecorder
from strategies.fedavg import SiloFedAvg


class FedBN(SiloFedAvg):
    """FedAvg with silo-local BatchNorm.

    Parameters
    ----------
    roster, recorder, num_rounds, min_sources
        As for :class:`SiloFedAvg`.
    """

    def __init__(
        self,
        roster: dict[int, Silo],
        recorder: RunRecorder,
        num_rounds: int,
        min_sources: int = 1,
    ) -> None:
        super().__init__(roster, recorder, num_rounds, min_sources)
        self.client_config = {"local-batchnorm": True}
