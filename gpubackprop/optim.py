"""Optimizers over the model's one flat parameter buffer, with torch.optim's semantics.

With parameters p, gradient g and step t = 1, 2, ...:

SGD(lr, momentum=mu, dampening=tau, nesterov, weight_decay=wd)
    d = g + wd p
    b = d at t = 1, else b = mu b + (1 - tau) d        (only when mu > 0)
    d = d + mu b if nesterov else b                    (only when mu > 0)
    p = p - lr d

Adam(lr, betas=(b1, b2), eps, weight_decay=wd)   (L2: wd p is added to g)
AdamW(...)                                         (decoupled: p = p (1 - lr wd) first)
    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

An optimizer is made without parameters (``SGD(lr=0.1)``) and bound to a model by
its first step: the state buffers (momentum, m, v) are then allocated like the
model's flat buffer. ``state_dict`` holds them flat, in the model's parameter order.
The step count is kept twice: ``steps`` on the host, and a copy on the model's
device that the update kernels read and advance themselves, so a train step
captured once as a CUDA graph counts right on every replay.
"""

import math

import numpy as np


def _check(name, value, low=0.0, high=math.inf, low_open=False, high_open=False):
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
    _buffers = ()  # names of the flat state buffers
    _n_scratch = 1

    def __init__(self, **hyperparams):
        self.hyperparams = hyperparams
        self.steps = 0
        self.state = {}
        self._scratch = None
        self._steps_on_device = None  # (1,) uint32: steps done, advanced by the update itself

    @property
    def lr(self):
        return self.hyperparams["lr"]

    @lr.setter
    def lr(self, value):
        self.hyperparams["lr"] = _check("lr", value, low_open=True)

    def _bind(self, model):
        """Make the state buffers match the model's flat buffer (size, dtype, device)."""
        backend, params = model.backend, model._params
        if self.state:
            size = next(iter(self.state.values())).shape[0]
            if size != params.shape[0]:
                raise ValueError(
                    f"this optimizer's state is for {size} parameters but the model has "
                    f"{params.shape[0]}; use a new optimizer for a different model"
                )
        for name in self._buffers:
            buf = self.state.get(name)
            if buf is None:
                self.state[name] = backend.zeros(params.shape, params.dtype)
            elif not (backend.is_native(buf) and buf.dtype == params.dtype):
                self.state[name] = backend.asarray(backend.to_host(buf), dtype=params.dtype)
        n = self.scratch_buffers(backend)
        s = self._scratch
        if s is None or len(s) != n or not all(backend.is_native(x) and x.dtype == params.dtype
                                               and x.shape == params.shape for x in s):
            self._scratch = tuple(backend.empty(params.shape, params.dtype) for _ in range(n))
        if self._steps_on_device is None or not backend.is_native(self._steps_on_device):
            self._steps_on_device = backend.asarray(np.array([self.steps], np.uint32))

    def scratch_buffers(self, backend):
        """How many parameter-sized temporaries the update needs on ``backend``."""
        return self._n_scratch if backend.elementwise_scratch else 0

    def step(self, model):
        """Apply one update from the model's current gradients."""
        self._bind(model)
        with model.backend.context():
            self._apply(model.backend, model._params, model._grads)

    def _apply(self, backend, p, g, found_inf=None):
        """Issue the update (on the device: one launch, capturable in a graph); count
        the step. With ``found_inf`` (fp16 loss scaling) the device may skip it:
        ``_sync_steps`` then corrects the host's count."""
        self.steps += 1
        self._update(backend, p, g, found_inf)

    def _sync_steps(self):
        """The host's step count from the device's (a host sync: once per epoch)."""
        if self._steps_on_device is not None:
            self.steps = int(_host(self._steps_on_device)[0])

    def _captured(self):
        """What a captured update depends on: (the buffers it reads and writes, the
        constants baked into its launch: the hyperparameters)."""
        return (self._steps_on_device, *self._scratch, *self.state.values()), repr(self.hyperparams)

    def state_dict(self):
        return {
            "type": type(self).__name__,
            "hyperparams": dict(self.hyperparams),
            "steps": self.steps,
            "state": {k: np.array(_host(v), copy=True) for k, v in self.state.items()},
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
            if name not in fresh._buffers:
                raise ValueError(f"unexpected state buffer {name!r} for {type(self).__name__}")
            arr = np.asarray(value)
            if arr.ndim != 1 or arr.dtype.kind != "f" or not np.isfinite(arr).all():
                raise ValueError(f"state buffer {name!r} must be a finite 1-D float array")
            state[name] = arr.copy()
        if len({a.shape for a in state.values()}) > 1:
            raise ValueError("state buffers differ in size")
        self.hyperparams, self.steps, self.state = fresh.hyperparams, int(steps), state
        self._buffers = fresh._buffers  # SGD keeps a momentum buffer only with momentum
        self._scratch = self._steps_on_device = None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{type(self).__name__}({args})"


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


class SGD(Optimizer):
    _buffers = ("momentum_buffer",)

    def __init__(self, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        momentum = _check("momentum", momentum)
        dampening = _check("dampening", dampening, high=1.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0 (as in torch.optim.SGD)")
        super().__init__(
            lr=_check("lr", lr, low_open=True),
            momentum=momentum,
            dampening=dampening,
            nesterov=bool(nesterov),
            weight_decay=_check("weight_decay", weight_decay),
        )
        if not momentum:
            self._buffers = ()

    def _update(self, backend, p, g, found_inf):
        h = self.hyperparams
        backend.sgd_update(
            p, g, self.state.get("momentum_buffer"), self._scratch[0] if self._scratch else None, self._steps_on_device,
            lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
            nesterov=h["nesterov"], weight_decay=h["weight_decay"], found_inf=found_inf,
        )


class Adam(Optimizer):
    _buffers = ("exp_avg", "exp_avg_sq")
    _n_scratch = 2
    _decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        super().__init__(
            lr=_check("lr", lr, low_open=True),
            betas=(_check("beta1", beta1, high=1.0, high_open=True), _check("beta2", beta2, high=1.0, high_open=True)),
            eps=_check("eps", eps),
            weight_decay=_check("weight_decay", weight_decay),
        )

    def _update(self, backend, p, g, found_inf):
        h = self.hyperparams
        backend.adam_update(
            p, g, self.state["exp_avg"], self.state["exp_avg_sq"], self._scratch, self._steps_on_device,
            lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1],
            eps=h["eps"], weight_decay=h["weight_decay"], decoupled=self._decoupled, found_inf=found_inf,
        )


class AdamW(Adam):
    _decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


OPTIMIZERS = {cls.__name__: cls for cls in (SGD, Adam, AdamW)}


def from_state_dict(d):
    """An optimizer rebuilt from ``state_dict()``'s output."""
    cls = OPTIMIZERS.get(d.get("type") if isinstance(d, dict) else None)
    if cls is None:
        raise ValueError(f"unknown optimizer type in state_dict; expected one of {sorted(OPTIMIZERS)}")
    opt = cls(**d["hyperparams"])
    opt.load_state_dict(d)
    return opt
