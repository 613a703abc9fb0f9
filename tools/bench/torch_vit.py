#!/usr/bin/env python3
"""PyTorch's ViT-g alone, timed as ../shared/bench/torch_anchor.py times it (the same HF
InstructBlipVisionModel with the same config and dtype, one warm-up pass, then the median), but
printing frames/s unrounded (torch_anchor.py rounds them to 0.1) and GFLOP/s from PyTorch's own
FlopCounterMode, for the README's side-by-side tables beside `gcg bench forward`.

    DTYPE=float32|bfloat16 VIT_BATCH=4 REPS=3 python3 tools/bench/torch_vit.py

Never run in CI (it needs torch and transformers).
"""
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import InstructBlipVisionConfig
from transformers.models.instructblip.modeling_instructblip import InstructBlipVisionModel

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}[os.environ.get("DTYPE", "float32")]
BATCH = int(os.environ.get("VIT_BATCH", 4))
REPS = int(os.environ.get("REPS", 3))

cfg = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                               num_attention_heads=16, image_size=224, patch_size=14, qkv_bias=True)
torch.manual_seed(0)
model = InstructBlipVisionModel(cfg).to(DT).eval()
px = torch.randn(BATCH, 3, 224, 224, dtype=DT)
with torch.no_grad():
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=px[:1])
    flops = counter.get_total_flops()
    times = []
    model(pixel_values=px)
    for _ in range(REPS):
        t = time.time()
        model(pixel_values=px)
        times.append(time.time() - t)
s = sorted(times)[len(times) // 2]
print(json.dumps({"torch": torch.__version__, "dtype": str(DT), "threads": torch.get_num_threads(),
                  "frames": BATCH, "seconds_all": [round(t, 3) for t in times],
                  "frames_per_s": round(BATCH / s, 4), "gflop_per_frame": flops / 1e9,
                  "gflops": round(flops * BATCH / s / 1e9, 1)}))
