import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)


# A UNet and budget small enough for end-to-end runs in seconds on 2 CPU cores.
TINY = [
    "model.block_out_channels=[16,32]", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2",
    "data.num_examples=64", "context.hidden_dim=16", "context.latent_dim=8",
]
