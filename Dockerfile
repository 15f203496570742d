# facegan_dist on a CUDA PyTorch base image.
#   docker build -t facegan .
#   docker run --gpus all -v $PWD/shards:/shards -v $PWD/runs:/runs -v ~/Downloads:/data facegan \
#       shard /data/archive.zip --out /shards/celeba64 --size 64
#   docker run --gpus all --shm-size 8g -v $PWD/shards:/shards -v $PWD/runs:/runs facegan \
#       train --data /shards/celeba64 --out /runs/celeba64 --preset paper-final --precision bf16
# Multi-GPU inside one container: override the entrypoint with accelerate:
#   docker run --gpus all --shm-size 8g --entrypoint accelerate ... facegan \
#       launch --config_file launch/multi-gpu.yaml --num_processes 8 facegan_dist train ...
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_DIR=/runs \
    OMP_NUM_THREADS=8

WORKDIR /opt/facegan
# torch/torchvision come from the base image and satisfy the pins in pyproject.toml, so pip only
# adds accelerate, webdataset, wandb, typer, rich, safetensors. Run from /opt/facegan,
# `accelerate launch facegan_dist train ...` finds the package folder.
COPY pyproject.toml README.md ./
COPY facegan_dist ./facegan_dist
COPY launch ./launch
COPY docs ./docs
RUN pip install --upgrade pip && pip install -e . && facegan --version

VOLUME ["/data", "/shards", "/runs"]
ENTRYPOINT ["facegan"]
CMD ["--help"]
