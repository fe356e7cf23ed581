"""segaware-caffe time --model M [--iterations N] [--weights W] [--phase train|test]: `caffe time`
on PyTorch: the average forward and backward time of every layer, then of the whole net.

Like caffe, each layer runs on its own, in net order, timed around its forward and (in reverse
order) its backward, so the figures add up to the forward-backward pass. The net is built
unfused (one Caffe layer = one timed step). Net inputs are fed with --input BLOB=FILE.npy, or
zeros of the declared shapes. On CUDA the device is synchronised around every timed call.
"""
import logging
import sys
import time

from segaware_caffe.tools.cmd_test import Clock, add_net_run_arguments, feed_from_args, net_from_args

log = logging.getLogger("segaware_caffe.cli")


def add_arguments(parser):
    add_net_run_arguments(parser, phase="train", iterations_help="timed forward-backward passes",
                          input_help="array fed to a net input (default: zeros of the declared "
                                     "shape)")


def __getattr__(name):
    # LayerTimer needs torch; it is loaded on first use so that the verb's options load without it
    if name == "LayerTimer":
        from segaware_caffe.tools.layer_timer import LayerTimer
        return LayerTimer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(args):
    from segaware_caffe.solvers.glog import ProgressBar, glog_to
    from segaware_caffe.tools.layer_timer import LayerTimer

    with glog_to(sys.stderr):
        net, device = net_from_args(args, fuse=False)
        feed = feed_from_args(net, args.input, device, zeros_for_missing=True)
        timer = LayerTimer(net, device)
        log.info("Performing Forward")
        timer.forward_backward(feed)          # warm-up (not counted), like caffe's initial pass
        timer = LayerTimer(net, device)
        log.info("*** Benchmark begins ***")
        log.info(f"Testing for {args.iterations} iterations.")
        forward_total = backward_total = 0.0
        start = time.perf_counter()
        bar = ProgressBar(args.iterations, enabled=None if args.progress else False)
        bar.update(0)
        clock, n = Clock(args.max_seconds), 0
        try:
            for i in range(args.iterations):
                if i and clock.expired():
                    log.info(clock.note(i, args.iterations))
                    break
                n = i + 1
                forward, backward = timer.forward_backward(feed)
                forward_total, backward_total = forward_total + forward, backward_total + backward
                log.info(f"Iteration: {i + 1} forward-backward time: {forward + backward:.3f} ms.")
                bar.update(i + 1)
        finally:
            bar.close()
        total = (time.perf_counter() - start) * 1e3
        log.info("Average time per layer: ")
        width = max((len(r.name) for r in timer.records), default=0)
        for r in timer.records:
            log.info(f"{r.name:>{width}}\tforward: {timer.forward_ms[id(r)] / n:.5g} ms.")
            log.info(f"{r.name:>{width}}\tbackward: {timer.backward_ms[id(r)] / n:.5g} ms.")
        log.info(f"Average Forward pass: {forward_total / n:.5g} ms.")
        log.info(f"Average Backward pass: {backward_total / n:.5g} ms.")
        log.info(f"Average Forward-Backward: {(forward_total + backward_total) / n:.5g} ms.")
        log.info(f"Total Time: {total:.5g} ms.")
        log.info("*** Benchmark ends ***")
    return 0
