"""gpubackprop: fast, verified backpropagation for multilayer perceptrons.

    import gpubackprop as gb
    model = gb.MLP([64, 128, 64, 10], device="auto", seed=0)
    history = model.fit(X, y, epochs=30, batch_size=32, optimizer=gb.optim.Adam(1e-3))
    model.evaluate(X_test, y_test)          # {"loss": ..., "accuracy": ...}
"""

from . import distributed, optim
from .backend import DeviceUnavailableError, OutOfMemoryError, get_backend
from .modelfile import load_metadata, load_optimizer
from .nn.mlp import MLP, load
from .nn.network import Network
from .nn.pack import MLPPack
from .tools.gradcheck import gradcheck
from .tools.trace import trace
from .train import callbacks
from .version import __version__

__all__ = ["MLP", "MLPPack", "Network", "optim", "callbacks", "distributed", "gradcheck", "trace", "load", "load_optimizer",
           "load_metadata", "get_backend", "DeviceUnavailableError", "OutOfMemoryError", "__version__"]
