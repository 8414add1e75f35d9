"""What every optimizer shares: binding to a network's flat buffers, the step count,
state_dict. The maths of each is in its own module (sgd.py, adam.py).

An optimizer is bound to a network's flat parameter and gradient buffers, at
construction (``SGD(0.1, params=model)``, as torch.optim takes parameters) or by
the trainer that first steps it (``model.fit(..., optimizer=SGD(0.1))``): its state
buffers (momentum, m, v) are then allocated like the flat buffer. ``step()``
applies one update from the bound gradients. ``state_dict`` holds the state flat,
in the model's parameter order.
The step count is kept twice: ``steps`` on the host, and a copy on the model's
device that the update kernels read and advance themselves, so a train step
captured once as a CUDA graph counts right on every replay.
"""

import math
from typing import NamedTuple

import numpy as np



class Update(NamedTuple):
    """The buffers of one optimizer update over the flat parameter buffer."""

    p: object
    g: object
    state: tuple  # the optimizer's state buffers, in its state_names order
    scratch: tuple  # parameter-sized temporaries (where the backend has elementwise_scratch), else ()
    steps: object  # (1,) uint32 on the device: steps done; the update reads and advances it
    found_inf: object = None  # (1,) flag: skip the update (and its count) when set
    params_flag: object = None  # (1,) flag: set when the parameters after the update hold Inf or NaN


class Flat(NamedTuple):
    """What an optimizer binds to: a backend and a flat parameter buffer with its
    gradient twin, and where the weights lie in it (slices; None: unknown). A Network
    is one too (``backend``, ``params``, ``grads``, ``weight_slices``)."""

    backend: object
    params: object
    grads: object
    weight_slices: object = None


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check(name, value, low=0.0, high=math.inf, low_open=False, high_open=False):
    try:
        value = float(value)  # Python floats: weak scalars that keep float32 work float32
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return value


class Optimizer:
    """The base of the optimizers: binding, the step count, state_dict.

    A subclass is one row of the optimizer table (``OPTIMIZERS``), in a module of
    its own: its state buffers (``state_names``), the parameter-sized temporaries
    its NumPy update needs (``n_scratch``), its hyperparameters as the update
    takes them (``settings()``), and the update three ways: ``reference`` (float64,
    for the tests), ``numpy_update`` (the CPU backend's) and ``kernel`` with
    ``kernel_args`` (its CUDA kernel in kernels/optimizers.cu and the arguments
    before the step count: the arrays, n, then ``kernel_scalars``, which a pack's
    member loops take per member). ``examples`` are the hyperparameters every check runs
    (selftest, the host harness, PyTorch's torch.optim twin of the same name).
    """

    state_names = ()
    n_scratch = 1
    kernel = None
    examples = ()

    def __init__(self, params=None, **hyperparams):
        self.hyperparams = hyperparams
        self.steps = 0
        self.state = {}
        self.scratch = ()
        self.decayed = None  # decay_biases=False: the gradient with the weights' L2 term, which the update reads
        self.device_steps = None  # (1,) uint32: steps done, advanced by the update itself
        self.bound = None  # the Flat it updates: buffers, not the model (no reference cycle)
        self._buffers = None  # an Update's buffers, set by bind
        if params is not None:
            self.bind(params)

    @property
    def lr(self):
        return self.hyperparams["lr"]

    @lr.setter
    def lr(self, value):
        self.hyperparams["lr"] = check("lr", value, low_open=True)

    def bind(self, model):
        """Bind to ``model``'s flat parameters and gradients (a Network, or a Flat):
        state buffers made or moved to match them in size, dtype and device. Cheap
        when nothing changed, so a trainer calls it every step (a callback may have
        loaded other state); bind again after ``model.to(device)``. Returns the
        optimizer."""
        backend, params = model.backend, model.params
        if self.state:
            size = next(iter(self.state.values())).shape[0]
            if size != params.shape[0]:
                raise ValueError(
                    f"this optimizer's state is for {size} parameters but the model has "
                    f"{params.shape[0]}; use a new optimizer for a different model"
                )
        for name in self.state_names:
            buf = self.state.get(name)
            if buf is None:
                self.state[name] = backend.zeros(params.shape, params.dtype)
            elif not (backend.is_native(buf) and buf.dtype == params.dtype):
                self.state[name] = backend.asarray(backend.to_host(buf), dtype=params.dtype)
        if not self.spares_biases:
            self.decayed = None
        elif not (self.decayed is not None and backend.is_native(self.decayed) and self.decayed.shape == params.shape
                  and self.decayed.dtype == params.dtype):
            self.decayed = backend.empty(params.shape, params.dtype)  # the gradient the update reads (_spare_biases)
        n = self.scratch_buffers(backend, params.dtype)
        s = self.scratch
        if len(s) != n or not all(backend.is_native(x) and x.dtype == params.dtype and x.shape == params.shape
                                  for x in s):
            self.scratch = tuple(backend.empty(params.shape, params.dtype) for _ in range(n))
        if self.device_steps is None or not backend.is_native(self.device_steps):
            self.device_steps = backend.asarray(np.array([self.steps], np.uint32))
        self.bound = Flat(backend, params, model.grads, getattr(model, "weight_slices", None))
        self._buffers = (params, model.grads, tuple(self.state[n] for n in self.state_names), self.scratch,
                         self.device_steps)  # an Update's, but found_inf: made here, not per step
        return self

    @property
    def spares_biases(self):
        """Whether the L2 penalty is on the weights alone (decay_biases=False, weight_decay > 0)."""
        h = self.settings()
        return bool(h.weight_decay) and not h.decay_biases

    def scratch_buffers(self, backend, dtype):
        """How many parameter-sized temporaries the update needs on ``backend``."""
        return backend.update_scratch(type(self), dtype)

    def state_bytes(self, model):
        """The bytes ``bind(model)`` allocates (for the out-of-memory message)."""
        return model.params.nbytes * (len(self.state_names) + self.scratch_buffers(model.backend, model.params.dtype)
                                      + self.spares_biases)

    def step(self, model=None, *, found_inf=None, params_flag=None):
        """Apply one update from the bound gradients, and count it. Given ``model``, bind
        it first and run on its device (``model.backend.context()``); without, the
        caller has the device current (a trainer's step, perhaps being captured).
        With ``found_inf`` (a device flag: fp16 overflow, or the divergence guard) the
        device skips a flagged step; ``sync_steps`` then corrects the host's count.
        With ``params_flag`` (the divergence guard's) it is set where the parameters
        after the step hold Inf or NaN. On the device it is one launch (two with
        ``params_flag``), capturable in a graph."""
        if model is not None:
            self.bind(model)
            with model.backend.context():
                return self.step(found_inf=found_inf, params_flag=params_flag)
        if self.bound is None:
            raise RuntimeError(f"{self!r} is not bound to a model: pass params=model, or train with "
                               "model.fit(..., optimizer=...) / model.train_step(X, y, optimizer)")
        self.steps += 1
        update = Update(*self._buffers, found_inf, params_flag)
        h = self.settings()
        if self.spares_biases:  # g + wd W for the weights alone, then an update without decay
            update = update._replace(g=self._spare_biases(update, h.weight_decay))
            h = h._replace(weight_decay=0.0)
        self.bound.backend.optimizer_update(type(self), update, h)

    def _spare_biases(self, update, decay):
        """The gradient with the L2 term decay W on each layer's weights, its biases' as
        they are, in a buffer of its own: the model's gradients stay backprop's."""
        if self.bound.weight_slices is None:
            raise RuntimeError("decay_biases=False needs an optimizer bound to a model, whose layout says where "
                               "its biases are")
        out, backend, ends = self.decayed, self.bound.backend, [w.start for w in self.bound.weight_slices[1:]]
        for w, bias_end in zip(self.bound.weight_slices, ends + [update.g.shape[0]]):
            backend.add_scaled(out[w], update.g[w], update.p[w], decay)
            backend.add_scaled(out[w.stop:bias_end], update.g[w.stop:bias_end], update.p[w.stop:bias_end], 0.0)
        return out

    def sync_steps(self):
        """The host's step count from the device's (a host sync: once per epoch)."""
        if self.device_steps is not None:
            self.steps = int(host(self.device_steps)[0])

    def buffers(self):
        """The buffers a captured update reads and writes."""
        return (self.device_steps, *self.scratch, *self.state.values(), self.decayed)

    def constants(self):
        """What a captured update bakes into its launch: the hyperparameters."""
        return repr(self.hyperparams)

    def settings(self):
        """The hyperparameters as the backend primitive takes them (a NamedTuple with
        ``weight_decay`` and ``decay_biases``: False spares the biases the L2 penalty,
        which ``step`` then adds to the weights' gradients itself, as scikit-learn's
        MLP spares them)."""
        raise NotImplementedError

    def state_dict(self):
        return {
            "type": type(self).__name__,
            "hyperparams": dict(self.hyperparams),
            "steps": self.steps,
            "state": {k: np.array(host(v), copy=True) for k, v in self.state.items()},
        }

    def load_state_dict(self, d):
        """Restore from ``state_dict()``'s output; checks everything before changing anything."""
        if not isinstance(d, dict) or set(d) != {"type", "hyperparams", "steps", "state"}:
            raise ValueError("not an optimizer state_dict: expected keys type, hyperparams, steps, state")
        if d["type"] != type(self).__name__:
            raise ValueError(f"state_dict is for {d['type']}, not {type(self).__name__}")
        fresh = type(self)(**d["hyperparams"])  # validates the hyperparameters
        steps = d["steps"]
        if not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        state = {}
        for name, value in d["state"].items():
            if name not in fresh.state_names:
                raise ValueError(f"unexpected state buffer {name!r} for {type(self).__name__}")
            arr = np.asarray(value)
            if arr.ndim != 1 or arr.dtype.kind != "f" or not np.isfinite(arr).all():
                raise ValueError(f"state buffer {name!r} must be a finite 1-D float array")
            state[name] = arr.copy()
        if len({a.shape for a in state.values()}) > 1:
            raise ValueError("state buffers differ in size")
        size = self.bound and self.bound.params.shape[0]
        if size is not None and any(a.shape[0] != size for a in state.values()):
            raise ValueError(f"this state is for {next(iter(state.values())).shape[0]} parameters but the optimizer is "
                             f"bound to {size}; use a new optimizer for a different model")
        self.hyperparams, self.steps, self.state = fresh.hyperparams, int(steps), state
        self.state_names = fresh.state_names  # SGD keeps a momentum buffer only with momentum
        self.scratch, self.device_steps = (), None
        if self.bound is not None:
            self.bind(self.bound)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{type(self).__name__}({args})"


def host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


