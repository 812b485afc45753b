"""SGD exactly as in the AlexNet paper, and learning-rate schedules.

Update (per parameter w with gradient g = mean over the batch of dL/dw, layer multipliers m_lr, m_wd):

    v <- momentum * v - weight_decay * m_wd * (lr * m_lr) * w - (lr * m_lr) * g
    w <- w + v

(the paper: v <- 0.9 v - 0.0005 eps w - eps <dL/dw>, w <- w + v). A layer's absolute settings (cuda-convnet's
``epsW``/``epsB``, ``momW``/``momB``, ``wc``) replace ``lr * m_lr``, ``momentum`` and ``weight_decay * m_wd``; an
absolute rate follows the run's schedule as a factor (the scheduled lr / the base lr: 1 with a constant schedule),
and a cuda-convnet2 schedule (``dexp[...]``) is evaluated at ``progress``, the fraction of the run's epochs done.
The arithmetic is the op ``ops.sgd_update`` (``sgd_update_many``: all parameters of a device and stream
in one call), in place on the parameter's device with the same sequence of
operations every step, so a run is deterministic.
"""
from __future__ import annotations

import math

import numpy as np

from convnet import ops


class SGD:
    def __init__(self, net, *, lr=0.01, momentum=0.9, weight_decay=5e-4):
        self.net = net
        self.lr = float(lr)
        self.base_lr = float(lr)  # the schedule's base: absolute layer rates are scaled by lr / base_lr
        self.progress = 0.0  # the fraction of the run done (the trainer sets it): cuda-convnet2's schedules
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.velocity = {}
        for key, layer, p in net.param_items():
            self.velocity[key] = layer.device.zeros(layer.params[p].shape, net.dtype)

    def step(self, items=None):
        """Update every parameter, or only ``items`` ([(key, layer, pname)] as ``net.param_items()`` lists them: a
        data-parallel run updates each bucket as soon as its gradients are averaged)."""
        groups = {}  # (device, stream) -> the updates there: one op call each (the update's order never matters)
        placements = self.net.placements
        for key, layer, p in self.net.param_items() if items is None else items:
            group = groups.setdefault((layer.device, id(placements.stream_of(layer))), (layer, []))[1]
            group.append((layer.params[p], layer.grads[p], self.velocity[key], *self.settings(layer, p)))
        for layer, updates in groups.values():
            ws, gs, vs, lrs, momentums, wds = zip(*updates)
            with placements.on(layer):  # on the parameters' device, on their tower's stream
                ops.sgd_update_many(layer.device, ws, gs, vs, lrs=lrs, momentums=momentums, weight_decays=wds)
        placements.join()  # the loop's current stream (the host, on emu) sees the new parameters

    def settings(self, layer, p):
        """(lr, momentum, weight_decay) of parameter ``p`` of ``layer`` now."""
        eps = layer.lr_abs.get(p)
        if eps is None:
            lr = self.lr * layer.lr_mult.get(p, 1.0)
        else:
            factor = self.lr / self.base_lr if self.base_lr > 0 else 1.0
            lr = (eps if isinstance(eps, float) else eps.value(self.progress)) * factor
        mom = layer.momentum.get(p)
        wd = layer.wd_abs.get(p)
        return (lr, self.momentum if mom is None else mom,
                self.weight_decay * layer.wd_mult.get(p, 0.0) if wd is None else wd)

    def state_dict(self):
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "velocity": {k: self.net.layers[k.split("/")[0]].device.to_numpy(v).copy()
                             for k, v in self.velocity.items()}}

    def load_state_dict(self, state):
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self.weight_decay = float(state["weight_decay"])
        for key, layer, p in self.net.param_items():
            a = np.asarray(state["velocity"][key])
            if a.shape != tuple(self.velocity[key].shape):
                raise ValueError(f"optimizer state for '{key}' has shape {a.shape}, "
                                 f"model has {tuple(self.velocity[key].shape)}")
            self.velocity[key] = layer.device.asarray(a, self.net.dtype)


class Schedule:
    """Learning-rate schedule, consulted once per epoch.

    * ``step``: lr = base * gamma ** (number of entries of ``steps`` (epochs) <= epoch).
    * ``plateau``: divide by 10 (``gamma``) when the test error has not improved (by more than ``threshold``,
      relative) for ``patience`` epochs; at most ``max_drops`` times (the paper: three times).
    * ``linear``: from the base rate down to zero at the end of ``total_epochs``, updated every step (the
      budgeted-training schedule: good when the number of epochs is fixed and small).
    * ``constant``.
    """

    KINDS = ("step", "plateau", "linear", "constant")

    def __init__(self, kind="step", base_lr=0.01, *, steps=(), gamma=0.1, patience=3, max_drops=3,
                 threshold=1e-3, total_epochs=None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown schedule '{kind}' (known: {', '.join(self.KINDS)})")
        self.kind = kind
        self.base_lr = float(base_lr)
        self.steps = sorted(int(s) for s in steps)
        self.gamma = float(gamma)
        self.patience = int(patience)
        self.max_drops = int(max_drops)
        self.threshold = float(threshold)
        self.total_epochs = total_epochs
        if kind == "linear" and not total_epochs:
            raise ValueError("the linear schedule needs the number of epochs")
        self.best = math.inf
        self.bad_epochs = 0
        self.drops = 0

    def lr_at(self, epoch, frac=0.0):
        """Learning rate for (0-based) ``epoch``, ``frac`` of the way through it."""
        if self.kind == "linear":
            return self.base_lr * max(0.0, 1.0 - (epoch + frac) / self.total_epochs)
        if self.kind == "step":
            return self.base_lr * self.gamma ** sum(1 for s in self.steps if s <= epoch)
        if self.kind == "plateau":
            return self.base_lr * self.gamma ** self.drops
        return self.base_lr

    def observe(self, error):
        """Tell the schedule the validation error at the end of an epoch."""
        if self.kind != "plateau":
            return
        if error < self.best * (1 - self.threshold):
            self.best = error
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience and self.drops < self.max_drops:
                self.drops += 1
                self.bad_epochs = 0

    def state_dict(self):
        return {"kind": self.kind, "base_lr": self.base_lr, "steps": self.steps, "gamma": self.gamma,
                "patience": self.patience, "max_drops": self.max_drops, "threshold": self.threshold,
                "best": self.best if math.isfinite(self.best) else None, "bad_epochs": self.bad_epochs,
                "drops": self.drops}

    def load_state_dict(self, s):
        self.best = math.inf if s.get("best") is None else float(s["best"])
        self.bad_epochs = int(s["bad_epochs"])
        self.drops = int(s["drops"])
