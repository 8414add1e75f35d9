# CPU image by default; for the GPU build pass --build-arg EXTRAS=cli,cuda13 and run with --gpus all.
FROM python:3.12-slim
ARG EXTRAS=cli
WORKDIR /opt/gpubackprop
COPY pyproject.toml README.md ./
COPY gpubackprop ./gpubackprop
COPY kernels ./kernels
RUN pip install --no-cache-dir ".[${EXTRAS}]"
WORKDIR /work
ENTRYPOINT ["gpubackprop"]
CMD ["train", "--dataset", "digits", "--hidden", "128", "64", "--epochs", "30", "--device", "auto", "--out", "/work/runs/digits"]
