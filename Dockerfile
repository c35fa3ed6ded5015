# The training image: OmniLong on the CUDA build of torch that the base image ships, with the
# `team` extra (PostgreSQL driver, DVC's S3 remote, boto3, SageMaker). docker-compose.yml runs
# its Prefect process worker in it; the same image serves a GPU node run by hand.
#
#   docker build -t omnilong-train .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<your release> -t omnilong-train .

# A PyTorch CUDA image: torch is already installed with its CUDA libraries, so `pip install`
# below finds `torch>=2.11` satisfied and never pulls a second (CPU or other CUDA) build.
# The devel variant: it has nvcc, which DeepSpeed's JIT-built ops and a flash-attn build need.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# git: DVC keeps its lineage in the project's git repository.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

# The project lives at one known path: prefect.yaml's pull step changes into it before a flow
# run, and docker-compose.yml mounts the user's checkout over this copy.
ENV OMNILONG_PROJECT_DIR=/opt/omnilong \
    DVC_NO_ANALYTICS=1 \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TORCH_EXTENSIONS_DIR=/opt/omnilong/.torch_extensions
WORKDIR /opt/omnilong

COPY . .
# Editable: a mounted checkout over /opt/omnilong is what gets imported, not a stale copy.
# OMNILONG_EXTRAS=team,gpu adds flash-attn and ring-flash-attn (a long build).
ARG OMNILONG_EXTRAS=team
RUN pip install --no-cache-dir -e ".[${OMNILONG_EXTRAS}]"

# A mounted checkout belongs to the host's user, not root: without this git (and so DVC) refuses
# to work in it ("dubious ownership").
RUN git config --system --add safe.directory /opt/omnilong

CMD ["omnilong", "--help"]
