"""Counting the memory tensors hold, for the benchmark and the tests."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created inside the mode that are still alive, and their peak: what
    torch.cuda.max_memory_allocated counts on a GPU, but measured after every op on any device, independent of the
    allocator (a kernel's internal scratch memory is not seen)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()  # ids of the storages being counted

    def freed(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is None or id(storage) in self.seen or id(storage) in inputs:
                continue  # counted already, or a view or in-place result of an input (a weight's .t() is not new)
            self.seen.add(id(storage))
            self.live += storage.nbytes()
            weakref.finalize(storage, self.freed, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out
