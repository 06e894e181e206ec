"""Eager vs traced vs frozen vs optimize_for_inference ResNet-50 bf16, batch 32, 2 threads.

The experiment of this folder's README; the eager model here keeps its BatchNorms, which is
what made freezing look 1.4x faster (the engine folds them itself).
"""

import time
import warnings

import torch
import torchvision

warnings.simplefilter("ignore")
torch.set_num_threads(2)
m = torchvision.models.resnet50(num_classes=431).eval()
m = m.to(memory_format=torch.channels_last).to(torch.bfloat16)
x = torch.randn(32, 3, 224, 224).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    variants = {
        "eager": m,
        "trace": torch.jit.trace(m, x),
        "freeze": torch.jit.freeze(torch.jit.trace(m, x)),
        "opt_inf": torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x))),
    }
    ref = m(x).float()
    for name, v in variants.items():
        for _ in range(2):
            y = v(x)
        print(name, "maxdiff", float((y.float() - ref).abs().max()))
    for r in range(3):
        for name, v in variants.items():
            t = time.perf_counter()
            n = 0
            while time.perf_counter() - t < 4:
                v(x)
                n += 32
            print(r, name, round(n / (time.perf_counter() - t), 1), flush=True)
