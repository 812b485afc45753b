"""The reductions of a data-parallel run over its ranks (:class:`convnet.distributed.World`), which leave the values
of a single process as they are."""
from __future__ import annotations

import numpy as np

from ..distributed import param_checksums


class Ranks:
    """``Ranks(world)``: this process's ``rank`` and the ranks' number ``size`` (0 and 1 without ``world``)."""

    def __init__(self, world=None):
        self.world = world
        self.rank, self.size = (world.rank, world.size) if world is not None else (0, 1)

    @property
    def several(self) -> bool:
        return self.world is not None and self.size > 1

    def sum(self, what, *values):
        """The sums over the ranks of the numbers ``values`` (float64; ``what`` names them in a timeout), or the
        values themselves for one process."""
        return tuple(self.world.sum(np.array(values, np.float64), what)) if self.several else values

    def any(self, flag, what) -> bool:
        """Whether ``flag`` is true on any rank (the ranks decide together)."""
        return self.world.any(flag, what) if self.several else flag

    def check_params(self, net, where):
        """DistributedError unless every rank holds bit-identical parameters (a checksum per parameter)."""
        if self.several:
            self.world.check_same(*param_checksums(net), where)

    def agree(self, facts, what):
        """RanksDisagree unless every rank holds the same ``facts`` (a dict of JSON values)."""
        if self.world is not None:
            self.world.check_agree(facts, what)
