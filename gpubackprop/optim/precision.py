"""Precision modes: what the GEMMs and the activations are computed in.

    float32   everything in the model's dtype (float32 or float64), exactly
    tf32      float32 storage; float32 GEMMs on tensor cores with operands rounded
              to 10-bit mantissas (PyTorch's allow_tf32), ~3e-4 relative error
    bf16      mixed precision: float32 master parameters, gradients and optimizer
              state; a bfloat16 copy of the weights, bfloat16 activations and
              deltas; GEMMs accumulate in float32
    fp16      as bf16 with float16, plus dynamic loss scaling: delta_L is scaled
              by S, the float32 gradients unscaled by 1/S and checked; a step with
              Inf or NaN in them is skipped and S halved; S doubles after 2000
              clean steps (torch.cuda.amp.GradScaler's defaults)

tf32 needs a GPU to differ from float32 (the CPU computes float32 exactly);
bf16 and fp16 need a backend with 16-bit kernels (the CUDA backend).
"""

import numpy as np

PRECISIONS = ("float32", "tf32", "bf16", "fp16")
MIXED = {"bf16": "bfloat16", "fp16": "float16"}
FLOAT16_MAX = 65504.0

# GradScaler's defaults.
INITIAL_SCALE = 2.0**16
BACKOFF, GROWTH, GROWTH_INTERVAL = 0.5, 2.0, 2000


def check(precision, dtype, backend):
    """Raise a ValueError naming the fix unless ``precision`` works for dtype on backend."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "float32" and dtype != "float32":
        raise ValueError(f"precision={precision!r} needs dtype='float32' (the master weights), not {dtype!r}")
    why = backend.precision_unavailable(precision)
    if why:
        raise ValueError(why)
    if precision == "bf16":
        try:
            backend.empty((1,), compute_dtype(precision, dtype))
        except (TypeError, ValueError) as e:  # CuPy's bfloat16 arrays are recent and optional
            raise ValueError(f"{backend.name} cannot hold bfloat16 arrays ({e}); use precision='fp16', "
                             "or a CuPy with bfloat16 support (14 or later, with ml_dtypes)") from None


def compute_dtype(precision, dtype):
    """The dtype of activations and deltas: 16-bit for bf16 / fp16, else ``dtype``."""
    if precision == "bf16":
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError("precision='bf16' needs ml_dtypes for the bfloat16 dtype: pip install ml_dtypes "
                              "(the cuda12 / cuda13 extras include it)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(MIXED.get(precision, dtype))


class LossScaler:
    """The loss scale S, the clean-step count and the overflow flag, on the device,
    so a captured step scales, checks and adapts with no host sync."""

    def __init__(self, backend):
        self.backend = backend
        self.scale = backend.asarray(np.array([INITIAL_SCALE], np.float32))
        self.clean_steps = backend.zeros((1,), np.uint32)
        self.found_inf = backend.zeros((1,), np.uint32)

    def unscale_and_check(self, grads):
        self.backend.unscale_and_check(grads, self.scale, self.found_inf)

    def update(self):
        self.backend.update_loss_scale(self.scale, self.clean_steps, self.found_inf,
                                       backoff=BACKOFF, growth=GROWTH, interval=GROWTH_INTERVAL)

    def value(self):
        return float(self.backend.to_host(self.scale)[0])
