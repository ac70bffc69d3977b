"""PyTorch's side of `cargo bench -p matscale-trainer --bench adamw`: the same step on the same
tensor layout, `torch.nn.utils.clip_grad_norm_` (max norm 1.0) + `torch.optim.AdamW.step`
(β = 0.9, 0.999, eps 1e-8, weight decay 1e-3, lr 1e-3; PyTorch's default implementation for
the device: `foreach` on CUDA), best and median of R repetitions after one warm-up, one JSON
line per implementation.

    python3 adamw_reference.py [--device cpu|cuda] [--params N] [--tensors K] [--reps R]

Layout as in adamw.rs: K tensors holding N parameters in all, sizes in the proportions
64 : 4 : 1 (a third of each), random weights and gradients (seed 0).
"""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--params", type=int, default=31_207_434)
    p.add_argument("--tensors", type=int, default=383)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    if a.tensors < 3 or a.reps < 1 or a.params < a.tensors:
        raise SystemExit("need --tensors >= 3, --reps >= 1 and --params >= --tensors")
    device = torch.device(a.device)
    weight = lambda i: (64, 4, 1)[i % 3]
    unit = a.params // sum(weight(i) for i in range(a.tensors))
    sizes = [max(weight(i) * unit, 1) for i in range(a.tensors)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
    results = []
    for name, kwargs in [("torch_default", {}), ("torch_fused", {"fused": True})]:
        if kwargs.get("fused") and device.type != "cuda":
            continue
        opt = torch.optim.AdamW(
            params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-3, **kwargs
        )
        seconds = []
        for rep in range(a.reps + 1):
            for q, g in zip(params, grads):
                q.grad = g.clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep > 0:
                seconds.append(time.perf_counter() - t)
        seconds.sort()
        results.append(
            {
                "mode": name,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "tensors": a.tensors,
                "params": sum(sizes),
                "dtype": "F32",
                "torch": torch.__version__,
                "best_s": seconds[0],
                "median_s": seconds[len(seconds) // 2],
            }
        )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
