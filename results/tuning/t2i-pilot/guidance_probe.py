"""Guidance-scale probe on the t2i pilot checkpoint: 300 samples per scale, prompt k -> digit k mod 10."""
import json, sys
import numpy as np, torch
from pathlib import Path
from core.sample import sample_pipeline
from core.data import digit_caption, ImageData
from core.config import DataConfig
from eval.metrics import digits_proxy_metrics
from core.sample import load_pngs as load_samples
run = Path("runs/mini-digits16-t2i-baseline-s0")
n = 300
labels = [k % 10 for k in range(n)]
real_data = ImageData(DataConfig(split="train"))
real = real_data.images(range(len(real_data)))
out = []
for g in (1.0, 2.0, 4.0, 7.0):
    paths = sample_pipeline(run / "pipeline", Path(f"/tmp/cfgprobe/g{g:g}"), range(n), "ddim", 50,
                            prompts=[digit_caption(l) for l in labels], guidance_scale=g)
    m = digits_proxy_metrics(load_samples(paths), real, np.array(labels))
    m = {"guidance": g, **{k: round(float(v), 4) for k, v in m.items()}}
    print(json.dumps(m), flush=True); out.append(m)
Path("results/tuning/t2i-pilot/guidance_probe.jsonl").write_text("".join(json.dumps(m) + "\n" for m in out))
