"""Caffe's learning-rate policies and per-blob update rules (BVLC fe0f44112, which the
fork did not change).

Everything runs on float32 tensors in place, in the order Caffe's CPU code runs its BLAS calls, so
trajectories match the original to float32 rounding. Scalars are rounded to float32 where Caffe
holds them in a `Dtype` (`local_rate`, `1 - momentum`, Adam's bias correction, ...).
"""
import math

import numpy as np
import torch

from ..errors import SolverError

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def f32(value):
    """`value` rounded to float32, as a Python float (what a C++ `float` holds)."""
    return float(np.float32(value))


def check_policy(param, where):
    """Raise SolverError (a ValueError) for a policy Caffe would reject (or divide by zero on) at its first update."""
    policy = param.lr_policy
    if not param.HasField("lr_policy"):
        raise SolverError(f"{where}: lr_policy is not set (one of {', '.join(POLICIES)})")
    if policy not in POLICIES:
        raise SolverError(f"{where}: unknown lr_policy {policy!r} (one of {', '.join(POLICIES)})")
    if policy == "step" and param.stepsize <= 0:
        raise SolverError(f"{where}: lr_policy \"step\" needs stepsize > 0, got {param.stepsize}")
    if policy == "poly" and param.max_iter <= 0:
        raise SolverError(f"{where}: lr_policy \"poly\" needs max_iter > 0, got {param.max_iter}")


def learning_rate(param, iteration, current_step):
    """(rate, current_step) of Solver::GetLearningRate for update number `iteration` (0-based).

    Pure: the caller stores the returned current_step (only "step" and "multistep" change it;
    "multistep" advances it by at most one per call, as Caffe does).
    """
    policy = param.lr_policy
    base_lr = np.float32(param.base_lr)
    gamma = np.float32(param.gamma)
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        current_step = iteration // param.stepsize
        rate = float(base_lr) * math.pow(float(gamma), current_step)        # pow(float, int): double
    elif policy == "exp":
        rate = float(base_lr) * math.pow(float(gamma), iteration)
    elif policy == "inv":
        x = np.float32(1) + gamma * np.float32(iteration)
        rate = base_lr * np.power(x, -np.float32(param.power))                # powf
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and iteration >= param.stepvalue[current_step]:
            current_step += 1
        rate = float(base_lr) * math.pow(float(gamma), current_step)
    elif policy == "poly":
        x = np.float32(1) - np.float32(iteration) / np.float32(param.max_iter)
        rate = base_lr * np.power(x, np.float32(param.power))
    elif policy == "sigmoid":
        z = -gamma * (np.float32(iteration) - np.float32(param.stepsize))
        rate = base_lr * (np.float32(1) / (np.float32(1) + np.exp(z)))
    else:
        raise SolverError(f"unknown lr_policy {policy!r} (one of {', '.join(POLICIES)})")
    return f32(rate), current_step


class UpdateRule:
    """One solver type. `update` turns the regularised diff `g` (a param's .grad, modified in
    place) into the value Caffe subtracts from the data, updating this blob's history tensors."""
    TYPE = ""
    HISTORY_SETS = 1     # history tensors per learnable blob (AdaDelta/Adam keep two lists)
    TAKES_MOMENTUM = True    # False: Caffe refuses a nonzero momentum for this type

    def __init__(self, param, where):
        self.momentum = f32(param.momentum)
        self.delta = f32(param.delta)
        if not self.TAKES_MOMENTUM and self.momentum != 0:
            raise SolverError(f"{where}: momentum cannot be used with {self.TYPE} "
                              f"(got {self.momentum})")

    def update(self, g, history, local_rate, iteration):
        raise NotImplementedError


class SGD(UpdateRule):
    """h = local_rate*g + momentum*h; w -= h."""
    TYPE = "SGD"

    def update(self, g, history, local_rate, iteration):
        (h,) = history
        h.mul_(self.momentum).add_(g, alpha=local_rate)
        g.copy_(h)


class Nesterov(UpdateRule):
    """h_new = local_rate*g + momentum*h; w -= (1+momentum)*h_new - momentum*h."""
    TYPE = "Nesterov"

    def update(self, g, history, local_rate, iteration):
        (h,) = history
        previous = h.clone()
        h.mul_(self.momentum).add_(g, alpha=local_rate)
        previous.mul_(-self.momentum).add_(h, alpha=f32(1 + np.float32(self.momentum)))
        g.copy_(previous)


class AdaGrad(UpdateRule):
    """h += g²; w -= local_rate * g / (sqrt(h) + delta)."""
    TYPE = "AdaGrad"
    TAKES_MOMENTUM = False

    def update(self, g, history, local_rate, iteration):
        (h,) = history
        h.add_(g * g)
        step = g.div_(h.sqrt().add_(self.delta))
        step.mul_(local_rate)


class RMSProp(UpdateRule):
    """h = rms_decay*h + (1-rms_decay)*g²; w -= local_rate * g / (sqrt(h) + delta)."""
    TYPE = "RMSProp"
    TAKES_MOMENTUM = False

    def __init__(self, param, where):
        super().__init__(param, where)
        self.rms_decay = f32(param.rms_decay)   # proto has no default: 0 when unset
        if not 0 <= self.rms_decay <= 1:
            raise SolverError(f"{where}: rms_decay must be in [0, 1], got {self.rms_decay}")

    def update(self, g, history, local_rate, iteration):
        (h,) = history
        h.mul_(self.rms_decay).add_(g * g, alpha=f32(1 - np.float32(self.rms_decay)))
        g.div_(h.sqrt().add_(self.delta)).mul_(local_rate)


class AdaDelta(UpdateRule):
    """h1 = m*h1 + (1-m)*g²; u = g*sqrt((h2+delta)/(h1+delta)); h2 = m*h2 + (1-m)*u²;
    w -= local_rate*u. History: [h1 of every blob] then [h2 of every blob]."""
    TYPE = "AdaDelta"
    HISTORY_SETS = 2

    def update(self, g, history, local_rate, iteration):
        grad_sq, update_sq = history
        one_minus = f32(1 - np.float32(self.momentum))
        grad_sq.mul_(self.momentum).add_(g * g, alpha=one_minus)
        ratio = (update_sq + self.delta).div_(grad_sq + self.delta).sqrt_()
        g.mul_(ratio)
        update_sq.mul_(self.momentum).add_(g * g, alpha=one_minus)
        g.mul_(local_rate)


class Adam(UpdateRule):
    """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g²;
    w -= local_rate * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + delta), t = iter + 1,
    b1 = momentum (0 when unset!), b2 = momentum2. History: [m of every blob] then [v ...]."""
    TYPE = "Adam"
    HISTORY_SETS = 2

    def __init__(self, param, where):
        super().__init__(param, where)
        self.momentum2 = f32(param.momentum2)

    def update(self, g, history, local_rate, iteration):
        m, v = history
        beta1, beta2 = np.float32(self.momentum), np.float32(self.momentum2)
        t = iteration + 1
        # Caffe: pow(float, int) is double, the quotient is stored as a float
        correction = np.float32(math.sqrt(1.0 - math.pow(float(beta2), t))
                                / (1.0 - math.pow(float(beta1), t)))
        m.mul_(float(beta1)).add_(g, alpha=f32(np.float32(1) - beta1))
        v.mul_(float(beta2)).add_(g * g, alpha=f32(np.float32(1) - beta2))
        step = v.sqrt().add_(self.delta)
        torch.div(m, step, out=g)
        g.mul_(f32(np.float32(local_rate) * correction))


RULES = {cls.TYPE: cls for cls in (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)}


def make_rule(param, where):
    """The UpdateRule for `param.type` (the legacy solver_type enum is upgraded by read_solver)."""
    cls = RULES.get(param.type)
    if cls is None:
        raise SolverError(f"{where}: unknown solver type {param.type!r} "
                         f"(known types: {', '.join(sorted(RULES))})")
    return cls(param, where)


def regularize(g, w, local_decay, regularization_type):
    """Solver::Regularize: L2 adds local_decay*w, L1 adds local_decay*sign(w) (sign(0) = 0)."""
    if not local_decay:
        return
    if regularization_type == "L2":
        g.add_(w, alpha=local_decay)
    else:
        g.add_(torch.sign(w), alpha=local_decay)
