import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Two threads, shared by the pytest-xdist workers (pyproject.toml): more threads than cores on this 2-core machine
# made OpenMP spin (two processes at 2 threads each trained 20x slower than at 1 thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


# A UNet and budget small enough for end-to-end runs in seconds on 2 CPU cores.
TINY = [
    "model.block_out_channels=[16,32]", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2",
    "data.num_examples=64", "context.hidden_dim=16", "context.latent_dim=8",
]
