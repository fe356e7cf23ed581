"""Batches for the data layers: a torch Dataset over list items, an endless sampler with Caffe's
epoch order, and a persistent DataLoader iterator.

Caffe's data layers walk their list forever: at the end of the list they start again (reshuffled
when `shuffle` is set), and a batch may span the end of one pass and the start of the next.
`EndlessSampler` yields exactly that order (the first pass starts `rand_skip`-random items in),
so one DataLoader iterator lives as long as the layer. Each item carries its own random seed,
drawn with the shuffle order from one generator seeded from torch's global generator when the
layer is built: `torch.manual_seed` before building a net makes its batches reproducible, with
any number of workers.
"""
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import SegawareError
from ..layer import CaffeLayer
from .images import DataError

WORKERS_ENV = "SEGAWARE_DATA_WORKERS"


def default_num_workers():
    """$SEGAWARE_DATA_WORKERS if set, else min(2, number of CPUs)."""
    value = os.environ.get(WORKERS_ENV)
    if value is not None and value.strip():
        try:
            workers = int(value)
        except ValueError:
            raise ValueError(f"${WORKERS_ENV} must be a non-negative integer, got {value!r}") from None
        if workers < 0:
            raise ValueError(f"${WORKERS_ENV} must be a non-negative integer, got {value!r}")
        return workers
    return min(2, os.cpu_count() or 1)


class EndlessSampler(Sampler):
    """Yields (item index, seed) forever in Caffe's order: pass after pass over `count` items,
    each pass a fresh permutation when `shuffle`, the first pass starting at `skip`."""

    def __init__(self, count, *, shuffle, skip, seed):
        self.count, self.shuffle, self.skip, self.seed = count, shuffle, skip, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        start = self.skip
        while True:
            if self.shuffle:
                order = torch.randperm(self.count, generator=generator).tolist()
            else:
                order = range(self.count)
            for index in order[start:]:
                item_seed = int(torch.randint(2 ** 62, (1,), generator=generator).item())
                yield index, item_seed
            start = 0


class ItemFailure:
    """A reader's or collate's error, carried out of a DataLoader worker as a value: raised there,
    torch would re-raise it in the main process with the worker's whole traceback in its message.
    BatchStream raises it again, message as written."""

    def __init__(self, error):
        self.error_type, self.message = type(error), str(error)

    def reraise(self):
        try:
            error = self.error_type(self.message)
        except Exception:
            error = DataError(self.message)
        raise error from None


class ListDataset(Dataset):
    """dataset[(index, seed)] = reader(index, torch.Generator seeded with seed), or an
    ItemFailure for an item the reader reports as unreadable."""

    def __init__(self, reader, count):
        self.reader, self.count = reader, count

    def __len__(self):
        return self.count

    def __getitem__(self, key):
        index, seed = key
        try:
            return self.reader(index, torch.Generator().manual_seed(seed))
        except SegawareError as e:
            return ItemFailure(e)


class StackBatch:
    """Collate: stack the items' arrays top by top into tensors; a clear error when items of one
    batch differ in size (possible without a crop)."""

    def __init__(self, layer_label):
        self.layer_label = layer_label

    def __call__(self, items):
        failures = [item for item in items if isinstance(item, ItemFailure)]
        if failures:
            return failures[0]
        try:
            return self._stack(items)
        except SegawareError as e:
            return ItemFailure(e)

    def _stack(self, items):
        tops = []
        for top_index, arrays in enumerate(zip(*items)):
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise DataError(
                    f"{self.layer_label}: the items of one batch have different sizes for top "
                    f"{top_index} ({', '.join(str(s) for s in sorted(shapes))}); without a crop "
                    f"every image of a batch must have the same size (set crop_size, "
                    f"new_height/new_width, or batch_size: 1)")
            tops.append(torch.from_numpy(np.stack(arrays)))
        return tuple(tops)


class BatchStream:
    """A persistent DataLoader iterator over an EndlessSampler, started on first use."""

    def __init__(self, dataset, sampler, *, batch_size, num_workers, collate):
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                 num_workers=num_workers, collate_fn=collate,
                                 persistent_workers=False)
        self._iterator = None

    def next(self):
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        if isinstance(batch, ItemFailure):
            batch.reraise()
        return batch

    def close(self):
        """Stop the worker processes (a later `next` starts again from the first batch)."""
        self._iterator = None

    def __getstate__(self):
        # a live iterator (worker processes, queues) cannot be copied or pickled
        state = dict(self.__dict__)
        state["_iterator"] = None
        return state


class BatchLayer(CaffeLayer):
    """A data layer fed by a BatchStream: no bottoms; forward() returns the next batch, tops in
    order, on the layer's device and dtype (those of the net). Subclasses call `_start_stream`
    from __init__."""
    BOTTOMS = (0, 0)

    def _start_stream(self, dataset, sampler, *, batch_size, top_shapes, num_workers, collate):
        self.batch_size = batch_size
        self.top_shapes = [tuple(s) for s in top_shapes]
        # follows net.to(device, dtype); never saved
        self.register_buffer("_placement", torch.empty(0), persistent=False)
        self.stream = BatchStream(dataset, sampler, batch_size=batch_size, num_workers=num_workers,
                                  collate=collate)

    def output_shapes(self, bottom_shapes):
        return list(self.top_shapes)

    def forward(self):
        batch = self.stream.next()[:len(self.top_shapes)]
        placement = self._placement
        tops = tuple(t.to(device=placement.device, dtype=placement.dtype) for t in batch)
        return tops if len(tops) > 1 else tops[0]

    def close(self):
        """Stop the loader's worker processes (a later forward starts the stream again)."""
        self.stream.close()
