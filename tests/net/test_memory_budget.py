"""The memory budget (segaware_caffe.budget): sizes from a prototxt are checked before anything is
allocated -- learnable blobs, filler draws, every top, the forward temporaries of the padded
layers -- and a net that needs more than the budget is refused naming the layer and the shape."""
import numpy as np
import pytest
import torch

import segaware_caffe as sc
from segaware_caffe import budget
from segaware_caffe.errors import LayerSetupError, MemoryBudgetError
from segaware_caffe.tools.cli import main

IP = """name: "ip"
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: %d } }
"""


def test_parse_and_format_sizes():
    assert budget.parse_bytes("8G") == 8 << 30
    assert budget.parse_bytes("512MiB") == 512 << 20
    assert budget.parse_bytes("1.5GB") == 1_500_000_000
    assert budget.parse_bytes("4e9") == 4_000_000_000
    assert budget.parse_bytes(" 1024 ") == 1024
    for bad in ("", "x", "-1G", "0", "8Q", "nan"):
        with pytest.raises(MemoryBudgetError, match="--max-memory: "):
            budget.parse_bytes(bad, "--max-memory")
    assert budget.format_bytes(3 << 30) == "3 GiB" and budget.format_bytes(100) == "100 B"


def test_the_default_is_half_of_what_the_process_may_use(monkeypatch):
    monkeypatch.delenv(budget.ENV, raising=False)
    total, what = budget.available_memory()
    limit, source = budget.resolve()
    assert limit == int(total * 0.5) and source.startswith("half of ") and what in source
    monkeypatch.setenv(budget.ENV, "3M")
    assert budget.resolve() == (3 << 20, f"${budget.ENV}")
    with budget.limit("5M"):
        assert budget.resolve() == (5 << 20, "--max-memory")
        assert budget.resolve(1000) == (1000, "max_bytes")
    monkeypatch.setenv(budget.ENV, "lots")
    with pytest.raises(MemoryBudgetError, match=r"\$SEGAWARE_MAX_BYTES: expected a size"):
        sc.Net(IP % 4)


def test_memory_bytes_counts_blobs_and_tops():
    net = sc.Net(IP % 5)
    params = (5 * 3 + 5) * 4
    tops = (2 * 3 + 2 * 5) * 4
    assert net.memory_bytes == params + tops and net.top_bytes == tops
    doubled = sc.Net(IP % 5, dtype=torch.float64)
    assert doubled.top_bytes == 2 * tops


def test_a_huge_learnable_blob_is_refused_before_allocation():
    with pytest.raises(MemoryBudgetError) as info:
        sc.Net(IP % 2_000_000_000)     # 24 GB of weights
    message = str(info.value)
    assert message.startswith("fc (InnerProduct): weight of shape (2000000000, 3) would take 22.4 GiB")
    assert "memory budget" in message and "--max-memory" in message and "SEGAWARE_MAX_BYTES" in message


def test_max_bytes_lowers_the_budget_and_names_what_the_net_holds():
    relus = ('name: "relus"\ninput: "x" input_shape { dim: 2 dim: 1000 }\n'
             'layer { name: "a" type: "ReLU" bottom: "x" top: "a" }\n'
             'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }\n'
             'layer { name: "c" type: "ReLU" bottom: "b" top: "b" }\n')   # in place: no memory
    assert sc.Net(relus, max_bytes=24_000).memory_bytes == 24_000
    with pytest.raises(MemoryBudgetError, match=r"^b \(ReLU\): top 'b' of shape \(2, 1000\) would "
                                                r"take 7.81 KiB; with the 15.6 KiB the net 'relus' "
                                                r"already holds, that is more than the memory "
                                                r"budget of 23.4 KiB \(max_bytes\)"):
        sc.Net(relus, max_bytes=23_999)


@pytest.mark.parametrize("layer, message", [
    ('input: "data" input_shape { dim: 1 dim: 3 dim: 100000 dim: 100000 }\n'
     'layer { name: "r" type: "ReLU" bottom: "data" top: "out" }',
     r"input \(Input\): top 'data' of shape \(1, 3, 100000, 100000\) would take 112 GiB"),
    ('input: "data" input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }\n'
     'layer { name: "up" type: "Interp" bottom: "data" top: "big" '
     'interp_param { height: 99999 width: 99999 } }',
     r"up \(Interp\): top 'big' of shape \(1, 3, 99999, 99999\) would take"),
    ('layer { name: "d" type: "DummyData" top: "d" dummy_data_param { '
     'shape { dim: 100000 dim: 100000 dim: 100 } } }',
     r"d \(DummyData\): the filled blob of shape \(100000, 100000, 100\) would take"),
    ('input: "data" input_shape { dim: 1 dim: 1 dim: 4 dim: 4 }\n'
     'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { '
     'pool: MAX kernel_size: 200000 pad: 199999 stride: 199999 } }',
     r"p \(Pooling\): the temporaries of its forward pass would take 596 GiB"),
    ('input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }\n'
     'layer { name: "dist" type: "Im2dist" bottom: "data" top: "dist" convolution_param { '
     'kernel_size: 3 pad: 99999 stride: 99999 } }',
     r"dist \(Im2dist\): the temporaries of its forward pass would take 298 GiB"),
    ('input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }\n'
     'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { '
     'num_output: 100000 kernel_size: 1000 } }',
     r"c \(Convolution\): weight of shape \(100000, 2, 1000, 1000\) would take"),
])
def test_sizes_from_the_prototxt_are_checked(layer, message):
    with pytest.raises(MemoryBudgetError, match=message):
        sc.Net(f'name: "n"\n{layer}\n', max_bytes="1G")


def test_a_negative_blob_shape_names_the_layer():
    # a layer built by hand with a negative blob shape: the layer type is named, no torch error
    from segaware_caffe.layers.scale import Scale
    with pytest.raises(MemoryBudgetError, match=r"Scale: scale would have shape \(3, -2\): a "
                                                r"negative dimension"):
        Scale(scale_shape=(3, -2))


def test_blobs_built_inside_a_net_are_charged_to_its_layer():
    from segaware_caffe.layers.scale import Scale
    with budget.building(budget.MemoryBudget(100), "s (Scale)", "s", "Scale"):
        with pytest.raises(MemoryBudgetError, match=r"^s \(Scale\): scale of shape \(26,\) would "
                                                    r"take 104 B"):
            Scale(scale_shape=(26,))
        with pytest.raises(LayerSetupError, match=r"^s \(Scale\): bias would have shape \(-1,\)"):
            Scale(scale_shape=(2,), bias_shape=(-1,))


def test_cli_max_memory(tmp_path, capsys):
    path = tmp_path / "net.prototxt"
    path.write_text(IP % 1000)
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    assert main(["run", str(path), "--input", f"x={tmp_path / 'x.npy'}", "--max-memory", "4K"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("segaware-caffe run: error: fc (InnerProduct): weight of shape (1000, 3)")
    assert "(--max-memory)" in err and "Traceback" not in err
    assert main(["--max-memory", "1G", "run", str(path), "--input", f"x={tmp_path / 'x.npy'}"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:      # argparse rejects it: exit status 2
        main(["run", str(path), "--max-memory", "lots"])
    assert stop.value.code == 2
    assert "argument --max-memory: expected a size such as 8G" in capsys.readouterr().err


def test_cli_run_checks_the_zeros_of_an_input_not_given(tmp_path, capsys):
    path = tmp_path / "net.prototxt"
    path.write_text('input: "a" input_shape { dim: 1 dim: 3 }\n'
                    'input: "b" input_shape { dim: 100000 dim: 100000 dim: 1000 }\n'
                    'layer { name: "r" type: "ReLU" bottom: "a" top: "out" }\n')
    np.save(tmp_path / "a.npy", np.ones((1, 3), np.float32))
    assert main(["run", str(path), "--input", f"a={tmp_path / 'a.npy'}"]) == 1
    err = capsys.readouterr().err
    assert "zeros for input 'b' (not given with --input) of shape (100000, 100000, 1000) would take" in err
    path.write_text(path.read_text().replace("dim: 100000 dim: 100000 dim: 1000", "dim: -1 dim: 3"))
    assert main(["run", str(path), "--input", f"a={tmp_path / 'a.npy'}"]) == 1
    assert f"{path}: input blob 'b' is declared with a negative dimension, shape (-1, 3)" in \
        capsys.readouterr().err


def test_eval_checks_its_confusion_matrix(monkeypatch):
    from segaware_caffe.tools.cmd_eval import evaluate
    with budget.limit(1 << 20):
        with pytest.raises(MemoryBudgetError, match=r"the 4000 x 4000 confusion matrix would "
                                                    r"take 366 MiB"):
            evaluate(".", ".", ["a"], num_classes=4000)
