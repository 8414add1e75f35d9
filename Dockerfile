# gpubackprop on an NVIDIA GPU.
#
#   docker build -t gpubackprop .
#   docker run --rm --gpus all -v "$PWD/runs:/work/runs" gpubackprop      # the demo: digits, device auto
#   docker run --rm --gpus all gpubackprop gpubackprop train --dataset FILE ...
#
# No CUDA base image: the cuda13 extra installs CuPy's pip wheel with its [ctk]
# extra, which brings the CUDA libraries CuPy loads (runtime, cuBLAS, NVRTC, and
# the headers every kernel compiles against) as NVIDIA's own pip wheels. The plain
# cupy-cuda13x wheel does not carry them; it expects a CUDA Toolkit on the system.
# So the image needs from the host
# only the NVIDIA driver (CUDA 13 capable), which `--gpus all` (the NVIDIA
# Container Toolkit) mounts in. Without a GPU, `--device auto` falls back to the
# CPU and says why.
#
# The test suite, inside the image (tests/ and bench/ are in it; the test extra
# must be too):
#   docker build --build-arg EXTRAS=cli,test,cuda13 -t gpubackprop:test .
#   docker run --rm --gpus all -w /opt/gpubackprop gpubackprop:test python -m pytest -q
# The package under test is the installed one (its source is removed after the
# install), kernels included; the kernel compile tests skip without nvcc and g++.
#
# A CPU-only image: --build-arg EXTRAS=cli
FROM python:3.12-slim

ARG EXTRAS=cli,cuda13
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLBACKEND=Agg

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin gpubackprop \
 && install -d -o gpubackprop -g gpubackprop /opt/gpubackprop /work

WORKDIR /opt/gpubackprop
COPY pyproject.toml README.md ./
COPY gpubackprop ./gpubackprop
COPY kernels ./kernels
# As the README and the Makefile install it: pip install ".[extras]".
RUN pip install ".[${EXTRAS}]" \
 && rm -rf gpubackprop kernels build ./*.egg-info
COPY --chown=gpubackprop:gpubackprop tests ./tests
COPY --chown=gpubackprop:gpubackprop bench ./bench

USER gpubackprop
WORKDIR /work
CMD ["gpubackprop", "train", "--dataset", "digits", "--hidden", "128", "64", "--epochs", "30", "--device", "auto", "--out", "/work/runs/digits"]
