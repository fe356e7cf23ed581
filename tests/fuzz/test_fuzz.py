"""Mutated inputs (bit flips, truncations, lies about lengths and shapes, huge or negative numbers
in prototxts, broken images) fed to every entry point: each failure must be one of the project's
error classes with a message that names the file or the layer, within 10 s and 4 GB.

Derandomized (the same examples on every run), without a hypothesis database; examples per
target: --fuzz-examples N or $SEGAWARE_FUZZ_EXAMPLES (default 100). bench/fuzz_campaign.py runs the
10,000-case campaign over the same targets.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import engine
from tests.fuzz.conftest import fuzz_examples

def fuzz_settings(config):
    return settings(max_examples=fuzz_examples(config), derandomize=True, database=None,
                    deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


@pytest.mark.parametrize("target", engine.TARGETS)
def test_mutated_inputs_fail_cleanly(target, fuzz_seeds, fuzz_scratch, request):
    @fuzz_settings(request.config)
    @given(st.data())
    def check(data):
        chooser = engine.DrawChooser(data)
        kind, seed = engine.pick_seed(target, fuzz_seeds, chooser)
        outcome = engine.run_case(target, kind, seed, fuzz_scratch, chooser)
        engine.clean(fuzz_scratch)
        assert not outcome.problem, (f"{target} on a mutated {kind} from "
                                     f"{seed.case.name if seed.case else '-'}/{seed.name}: "
                                     f"{outcome.outcome}: {outcome.detail}\n{outcome.message}")

    check()


def test_engine_classifies():
    from segaware_caffe.errors import NetBuildError
    assert engine.classify(None).outcome == "ok"
    assert engine.classify(NetBuildError("conv1 (Convolution): bad")).outcome == "reported"
    assert engine.classify(NetBuildError("bad"), names=("x.prototxt",)).outcome == "unnamed"
    odd_type = NetBuildError("exp (__import__('os')): unknown layer type")
    assert engine.classify(odd_type).outcome == "reported"
    assert engine.classify(KeyError("k")).outcome == "escaped"
    assert engine.classify(MemoryError()).outcome == "big-allocation"
    assert engine.classify(RuntimeError("DefaultCPUAllocator: can't allocate memory")).outcome \
        == "big-allocation"
    assert engine.classify(NotImplementedError("p (Pooling): STOCHASTIC")).outcome == "unsupported"
    assert engine.classify(engine.FuzzTimeout("10 s")).outcome == "hang"


def test_mutators_are_deterministic_and_change_the_input(fuzz_seeds):
    import random
    seed = fuzz_seeds["caffemodel"][0]
    first = [engine.mutate_proto(seed.data, engine.Chooser(random.Random(i))) for i in range(20)]
    again = [engine.mutate_proto(seed.data, engine.Chooser(random.Random(i))) for i in range(20)]
    assert first == again and sum(m != seed.data for m in first) >= 18
    text = fuzz_seeds["prototxt"][0].data
    assert any(engine.mutate_text(text, engine.Chooser(random.Random(i))) != text for i in range(5))
    cut = engine.cut_at_field_boundary(seed.data, engine.Chooser(random.Random(0)))
    assert len(cut) < len(seed.data) and seed.data.startswith(cut)


def test_time_limit_and_memory_cap():
    import time
    outcome = None
    with engine.time_limit(0.2):
        try:
            time.sleep(5)
        except engine.FuzzTimeout:
            outcome = "stopped"
    assert outcome == "stopped"
    import numpy as np
    previous = engine.limit_memory(1 << 30)
    try:
        with pytest.raises(MemoryError):
            np.ones(3 << 30, np.uint8)
    finally:
        engine.restore_memory(previous)
