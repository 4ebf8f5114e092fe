# radpath_fs in a container, for off-the-shelf prediction with a bundle (every other command works too,
# except `embed.compile: true`: torch.compile needs a C compiler, which these images lack; predict-case
# never compiles).
#
#   radpath bundle export --store S --config PIPELINE.yaml --out bundle      (on the machine with the store)
#   docker build -t radpath .
#   docker run --rm -v "$PWD/bundle:/bundle:ro" -v "$PWD/case:/case:ro" radpath \
#       predict-case --bundle /bundle /case
#
# CPU by default. GPU variant (README, "Off-the-shelf prediction"):
#   docker build -t radpath:gpu --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#   docker run --rm --gpus all -v ... radpath:gpu predict-case --device cuda --bundle /bundle /case
ARG BASE=python:3.11-slim
FROM ${BASE}

# torch/torchvision wheels from this index: the CPU ones carry no CUDA libraries (about 2 GB smaller).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# XGBoost's wheel links the system OpenMP runtime; libvips comes inside the pyvips[binary] wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/radpath
COPY pyproject.toml README.md ./
COPY radpath_fs ./radpath_fs
# torch first from TORCH_INDEX, so that installing the package finds it satisfied (a base image that
# already has torch keeps its own); then the package with pyvips[binary] and the rest from PyPI.
RUN pip install --index-url "${TORCH_INDEX}" torch torchvision \
    && pip install . \
    && radpath --help > /dev/null \
    && python -c "import pyvips; print('libvips', pyvips.version(0), pyvips.version(1), pyvips.version(2))"

# An unprivileged user; bundles and cases are mounted read-only. Tiles of the case go to a temporary
# folder under $TMPDIR (mount a scratch volume there for whole CPM slides: up to a few GB).
RUN useradd --create-home --uid 1000 radpath
USER radpath
WORKDIR /home/radpath
ENTRYPOINT ["radpath"]
CMD ["--help"]
