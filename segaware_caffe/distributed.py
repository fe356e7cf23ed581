"""What keeps the processes of a multi-process run (torchrun) training one net.

Caffe's multi-GPU training (P2PSync) gives every solver the root solver's parameters before the
first iteration; from then on all of them apply the same averaged update, so they stay equal. We
do the same: before the first step every rank takes rank 0's parameters (every blob of every
layer, the frozen ones included), solver history and iteration (`broadcast_state`), so ranks that
drew different random fillers (each seeds random_seed + rank), or resumed from different files,
start alike. Whether they still agree is checked where it matters (at the start and at every
snapshot): a digest of each layer's blobs is gathered from every rank (`check_ranks_agree`); a
mismatch is a SolverError naming the ranks and the first layer that differs.
"""
import zlib

import numpy as np
import torch

from .errors import SolverError


def unique_blobs(net):
    """[(layer name, blob index, tensor)] of every learnable blob of the net, each tensor once
    (shared blobs under their first owner), in Caffe order."""
    seen, out = set(), []
    for record in net.records:
        for i, blob in enumerate(record.module.caffe_blobs()):
            if id(blob) not in seen:
                seen.add(id(blob))
                out.append((record.name, i, blob))
    return out


def broadcast_state(net, history, counters, device):
    """Give every rank rank 0's blobs, `history` tensors and integer `counters` (a list; the
    broadcast values are returned)."""
    import torch.distributed as dist

    with torch.no_grad():
        for _, _, blob in unique_blobs(net):
            dist.broadcast(blob.data, src=0)
        for tensor in history:
            dist.broadcast(tensor, src=0)
    values = torch.tensor([int(c) for c in counters], dtype=torch.int64, device=device)
    dist.broadcast(values, src=0)
    return [int(v) for v in values.tolist()]


def layer_digests(net):
    """[(layer name, crc32 of its blobs' bytes, float64 sum of their values)] in Caffe order."""
    digests = {}
    for name, _, blob in unique_blobs(net):
        array = np.ascontiguousarray(blob.detach().to("cpu").numpy())
        crc, total = digests.get(name, (0, 0.0))
        digests[name] = (zlib.crc32(array.tobytes(), crc), total + float(array.sum(dtype=np.float64)))
    return [(name, crc, total) for name, (crc, total) in digests.items()]


def checksum(digests):
    """The number logged as the parameter checksum: the sum of every parameter value."""
    return sum(total for _, _, total in digests)


def first_disagreement(gathered):
    """None when every rank's digests are equal, else (rank a, rank b, layer, sum a, sum b) for
    the first layer (in Caffe order) where a rank differs from rank 0."""
    reference = gathered[0]
    for rank, digests in enumerate(gathered[1:], start=1):
        if digests == reference:
            continue
        for (name, crc, total), (other_name, other_crc, other_total) in zip(reference, digests):
            if name != other_name:
                return 0, rank, f"{name} / {other_name} (the ranks built different nets)", total, other_total
            if crc != other_crc:
                return 0, rank, name, total, other_total
        return 0, rank, "(a different number of layers)", checksum(reference), checksum(digests)
    return None


def check_ranks_agree(net, world_size, when):
    """Gather every rank's layer digests; raise SolverError (on every rank) if any differs from
    rank 0's. Returns the checksum (the same on all ranks). `when` names the moment in messages."""
    digests = layer_digests(net)
    if world_size > 1:
        import torch.distributed as dist
        gathered = [None] * world_size
        dist.all_gather_object(gathered, digests)
        found = first_disagreement(gathered)
        if found is not None:
            a, b, layer, sum_a, sum_b = found
            raise SolverError(
                f"the {world_size} processes disagree on the parameters {when}: rank {a} and rank "
                f"{b} differ first at layer {layer} (sum of its values {sum_a:.9g} vs {sum_b:.9g}); "
                f"every rank starts from rank 0's parameters, so they drifted apart since "
                f"(non-deterministic layers, or a process that changed its parameters on its own)")
    return checksum(digests)


# signal requests, ordered so that the strongest one any rank received wins
_REQUESTS = (None, "snapshot", "stop")


def agree_on_request(request, world_size, device):
    """The request (None, "snapshot" or "stop") every rank acts on: the strongest any rank got,
    so that all of them snapshot (a collective step) or stop together."""
    if world_size == 1:
        return request
    import torch.distributed as dist
    code = torch.tensor([_REQUESTS.index(request)], dtype=torch.int64, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return _REQUESTS[int(code.item())]
