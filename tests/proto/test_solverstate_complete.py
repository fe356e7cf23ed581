""".solverstate completeness: a state missing a field Caffe always writes (iter, learned_net,
current_step) is an error naming the file and the field, never a restore from step 0."""
import numpy as np
import pytest

from segaware_caffe import caffe_proto
from segaware_caffe.caffe_proto import CaffeFormatError, caffe_pb2


def _state_bytes(**fields):
    state = caffe_pb2.SolverState(**fields)
    state.history.add().CopyFrom(caffe_proto.array_to_blob(np.zeros((2, 3), np.float32)))
    return state.SerializeToString()


@pytest.mark.parametrize("missing", ["current_step", "learned_net", "iter"])
def test_solverstate_missing_a_field_is_an_error(tmp_path, missing):
    fields = dict(iter=7, learned_net="snap_iter_7.caffemodel", current_step=2)
    del fields[missing]
    path = tmp_path / "snap.solverstate"
    path.write_bytes(_state_bytes(**fields))
    with pytest.raises(CaffeFormatError, match=rf"snap\.solverstate: incomplete \.solverstate: no "
                                               rf"{missing} \(field \d\).*truncated"):
        caffe_proto.read_solverstate(path)


def test_solverstate_cut_before_its_last_field(tmp_path):
    whole = _state_bytes(iter=7, learned_net="m.caffemodel", current_step=3)
    state = caffe_proto.read_solverstate(whole)
    assert (state.iter, state.current_step, len(state.history)) == (7, 3, 1)
    tail = caffe_pb2.SolverState(current_step=3).SerializeToString()
    assert whole.endswith(tail)
    with pytest.raises(CaffeFormatError, match=r"<bytes>: incomplete .solverstate: no current_step "
                                               r"\(field 4\); .* \(1 here\)"):
        caffe_proto.read_solverstate(whole[:-len(tail)])


def test_solverstate_with_step_zero_is_complete():
    state = caffe_proto.read_solverstate(_state_bytes(iter=0, learned_net="", current_step=0))
    assert state.HasField("current_step") and state.current_step == 0


def test_learned_net_that_is_not_text(tmp_path):
    data = caffe_pb2.SolverState(iter=1, learned_net="ab", current_step=0).SerializeToString()
    path = tmp_path / "bad.solverstate"
    path.write_bytes(data.replace(b"ab", b"\xff\xfe"))
    with pytest.raises(CaffeFormatError, match=r"bad\.solverstate: field 'learned_net' is not valid "
                                               r"UTF-8 text \(b'\\xff\\xfe'\)"):
        caffe_proto.read_solverstate(path)
