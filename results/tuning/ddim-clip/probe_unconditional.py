import json, numpy as np, torch
from pathlib import Path
from core.sample import load_unet, denoise
from core.data import ImageData
from core.config import DataConfig
from diffusers import DDIMScheduler, DDPMScheduler
from eval.metrics import digits_proxy_metrics
torch.set_num_threads(2)
real_data = ImageData(DataConfig(split="train")); real = real_data.images(range(len(real_data)))
out = []
for run in ("mini-digits16-baseline-s0", "mini-digits16-conprediff-s0"):
    p = Path("runs") / run / "pipeline"
    unet = load_unet(p).eval(); cfg = DDPMScheduler.from_pretrained(p / "scheduler").config
    for clip in (True, False):
        sch = DDIMScheduler.from_config(cfg, clip_sample=clip)
        with torch.no_grad():
            x = torch.cat([denoise(unet, sch, range(i, i + 100), 50, "cpu") for i in (0, 100, 200)])
        m = digits_proxy_metrics(((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1, real)
        r = {"run": run, "ddim_clip_sample": clip, "n": 300, "steps": 50, **{k: round(float(v), 4) for k, v in m.items()}}
        print(json.dumps(r), flush=True); out.append(r)
Path("results/tuning/ddim-clip/probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
