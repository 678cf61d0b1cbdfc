import json, numpy as np, torch
from pathlib import Path
from core.sample import load_unet, denoise
from core.text import TextEncoder
from core.data import ImageData, digit_caption
from core.config import DataConfig
from diffusers import DDIMScheduler, DDPMScheduler
from eval.metrics import digits_proxy_metrics
torch.set_num_threads(2)
p = Path("runs/mini-digits16-t2i-baseline-s0/pipeline")
unet = load_unet(p).eval()
cfg = DDPMScheduler.from_pretrained(p / "scheduler").config
text = TextEncoder(json.loads((p / "text_encoder.json").read_text())["text_encoder"], "cpu")
real_data = ImageData(DataConfig(split="train")); real = real_data.images(range(len(real_data)))
n = 200; labels = [k % 10 for k in range(n)]
cond = text.encode([digit_caption(l) for l in labels]); uncond = text.encode([""] * n)
out = []
for name, kw, g in [("clip_sample=True (as run)", {}, 2.0), ("clip_sample=False", {"clip_sample": False}, 2.0),
                    ("timestep_spacing=trailing", {"timestep_spacing": "trailing"}, 2.0)]:
    sch = DDIMScheduler.from_config(cfg, **kw)
    with torch.no_grad():
        x = torch.cat([denoise(unet, sch, range(i, i + 100), 50, "cpu", cond[i:i+100], uncond[i:i+100], g) for i in (0, 100)])
    m = digits_proxy_metrics(((x.clamp(-1, 1) + 1) / 2 * 255).round() / 255 * 2 - 1, real, np.array(labels))
    r = {"ddim": name, "guidance": g, "n": n, **{k: round(float(v), 4) for k, v in m.items()}}
    print(json.dumps(r), flush=True); out.append(r)
with open("results/tuning/t2i-pilot/guidance_probe.jsonl", "a") as f:
    f.write("".join(json.dumps(r) + "\n" for r in out))
