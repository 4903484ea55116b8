"""Probes the tests wrap around code to see what it does, not only what it returns."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class FreshAllocations(TorchDispatchMode):
    """Records the byte size of every op output whose storage is new (aliases no input): an exact
    list of what an op sequence allocates.

        with FreshAllocations() as rec:
            f(x)
        assert max(rec.sizes) < limit
    """

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(o.untyped_storage().nbytes())
        return out
