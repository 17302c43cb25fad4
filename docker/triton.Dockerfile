# Triton on the GPU, serving the repository `templar export` writes: <rm> (entry, Python backend),
# <rm>_preprocess (Python backend: the RM's own chat template + tokenizer) and <rm>_model (onnxruntime_onnx with
# CUDA/TensorRT acceleration, or tensorrt_plan). The official image brings the server and its backends; this adds
# the Templar code the Python models import, with the versions pinned in constraints.txt.
ARG TRITON_VERSION=25.11
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /opt/templar
COPY constraints.txt pyproject.toml README.md ./
COPY templar templar
COPY trainer trainer
COPY tools tools

# What the Python models import (tests/test_deploy.py keeps this list in step with the code): no torch here (but
# below, for RMs served by their own forward), the scoring model runs on Triton's own ONNX Runtime / TensorRT backends; onnxruntime (fp32) and openvino (bf16) serve the CPU configs.
RUN pip install -c constraints.txt numpy transformers tokenizers jinja2 onnxruntime openvino \
 && pip install --no-deps .
# An RM served by its own forward (one whose code combines its own objectives, e.g. ArmoRM:
# templar/export/own_forward.py) runs torch in the Python backend: build with OWN_FORWARD_TORCH=1
# (docker compose: TEMPLAR_OWN_FORWARD_TORCH=1). PyPI's Linux torch is the CUDA build.
ARG OWN_FORWARD_TORCH=0
RUN if [ "${OWN_FORWARD_TORCH}" = 1 ]; then pip install -c constraints.txt torch==2.13.0; fi

EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models"]
