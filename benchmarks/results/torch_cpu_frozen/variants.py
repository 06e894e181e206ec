import time, warnings, torch, torchvision
warnings.simplefilter("ignore")
torch.set_num_threads(2)
m = torchvision.models.resnet50(num_classes=431).eval().to(memory_format=torch.channels_last).to(torch.bfloat16)
x = torch.randn(32,3,224,224).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    tr = torch.jit.trace(m, x)
    fr = torch.jit.freeze(torch.jit.trace(m, x))
    oi = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x)))
    vs = {"eager": m, "trace": tr, "freeze": fr, "opt_inf": oi}
    ref = m(x).float()
    for k, v in vs.items():
        for _ in range(2): y = v(x)
        print(k, "maxdiff", float((y.float()-ref).abs().max()))
    for r in range(3):
        for k, v in vs.items():
            t = time.perf_counter(); n = 0
            while time.perf_counter() - t < 4: v(x); n += 32
            print(r, k, round(n/(time.perf_counter()-t),1), flush=True)
