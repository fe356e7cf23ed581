"""Data layers that read a stream (records of a database, rows of HDF5 files, random windows) rather
than indexed list items: a torch IterableDataset yields one item at a time in Caffe's order, a
DataLoader groups them into batches.

The stream runs in at most one worker process (like Caffe's single prefetch thread): an iterable
dataset would be replicated, not split, across several workers. $SEGAWARE_DATA_WORKERS=0 reads in
the main process. Random choices come from one torch.Generator per layer, seeded from torch's
global generator when the net is built, so `torch.manual_seed` before building makes the batches
reproducible.
"""
import torch
from torch.utils.data import IterableDataset

from .loader import BatchLayer, StackBatch, default_num_workers


def draw_seed():
    """A seed for a layer's random stream, from torch's global generator."""
    return int(torch.randint(2 ** 62, (1,)).item())


class ItemStream(IterableDataset):
    """Yields the items (tuples of numpy arrays, one per top) of `produce(generator)`, where
    `produce` is a plain-valued callable object (it is copied into the worker process)."""

    def __init__(self, produce, seed):
        super().__init__()
        self.produce, self.seed = produce, seed

    def __iter__(self):
        return iter(self.produce(torch.Generator().manual_seed(self.seed)))


class StreamDataLayer(BatchLayer):
    """No bottoms; forward() returns the next batch, tops in order, on the net's device and dtype.
    Subclasses call `_setup_stream(...)` from __init__."""

    def _setup_stream(self, *, produce, seed, batch_size, top_shapes, label, num_workers=None):
        self.label = label
        workers = default_num_workers() if num_workers is None else num_workers
        self._start_stream(ItemStream(produce, seed), None, batch_size=batch_size,
                           top_shapes=top_shapes, num_workers=min(workers, 1),
                           collate=StackBatch(label))
