"""Results in the caller's array library.

Inputs are taken from anything array-like: NumPy arrays (any order, read-only,
memmaps), lists, PyTorch / JAX CPU tensors (through ``__array__``, no copy), and on
the CUDA backend CuPy arrays and other libraries' GPU arrays (through
``__cuda_array_interface__``, no copy; see ``validation``). Outputs go back the
same way where that is cheap: CuPy in, CuPy out; PyTorch in, PyTorch out
(``torch.from_dlpack``, no copy, on the input's side of the bus when the model
is there too); JAX in, JAX out; anything else gets NumPy.
"""

import numpy as np


def library(x):
    """The top-level module of x's type: "numpy", "cupy", "torch", "jax", ..."""
    module = type(x).__module__.partition(".")[0]
    return "jax" if module == "jaxlib" else module


def like(x, out, backend):
    """``out`` (an array of ``backend``) as the caller of ``x`` would want it back."""
    lib = library(x)
    if backend.is_native(x) and not isinstance(x, np.ndarray):
        return out  # a device array in, a device array out
    if lib == "torch":
        import torch

        on_gpu = getattr(x, "is_cuda", False) and not isinstance(out, np.ndarray)
        return torch.from_dlpack(out if on_gpu else backend.to_host(out))
    if lib == "jax":
        import jax.numpy as jnp

        return jnp.asarray(backend.to_host(out))
    return backend.to_host(out)
