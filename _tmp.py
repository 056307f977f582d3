import time, torch
from backbones import create
b=create("wide_resnet101_2", out_features=("C2","C3","C4","C5")).eval()
x=torch.randn(1,3,67,93)
with torch.no_grad():
    b(x)
    with torch.autograd.profiler.profile() as prof:
        b(x)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
x2=torch.randn(2,3,67,93)
with torch.no_grad():
    for xx in (x, x2, x, x2):
        t=time.time(); b(xx); print(xx.shape[0], time.time()-t)
