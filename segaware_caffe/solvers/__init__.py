"""Pieces of the solver: Caffe's learning-rate policies and update rules (`rules`), glog-style
log lines and the progress bar (`glog`). The Solver itself is `segaware_caffe.solver.Solver`."""
from .glog import GlogFormatter, ProgressBar, glog_to
from .rules import POLICIES, RULES, learning_rate, make_rule

__all__ = ["GlogFormatter", "ProgressBar", "glog_to", "POLICIES", "RULES", "learning_rate",
           "make_rule"]
