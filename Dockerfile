# The livecopy image: every service and worker is `livecopy <command>`.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# CPU build by default; for a GPU generator build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY core core
COPY stream stream
COPY models models
COPY engine engine
COPY services services
COPY livecopy livecopy
RUN pip install .
ENV LIVECOPY_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 \
    LIVECOPY_REDIS__URL=redis://redis:6379/0 \
    LIVECOPY_KAFKA__FETCH_WAIT_MAX_MS=50
ENTRYPOINT ["livecopy"]
CMD ["--help"]
