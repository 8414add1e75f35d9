"""The CUDA sources, installed as the package ``gpubackprop.kernels`` so the wheel
carries them and ``importlib.resources.files("gpubackprop.kernels")`` finds them."""
