"""Side-by-side reference of `cargo xtask bench kernels`: the same ops at the same sizes on the
same device, in the libraries EquiformerV2 uses.

* spherical harmonics: e3nn `o3.spherical_harmonics` (l = 0..lmax, normalize, 'component');
* rotate -> SO(2) convolution -> rotate back: the fairchem-1.x-style PyTorch layer of
  so2_torch.py (dense [E, (lmax+1)^2, (lmax+1)^2] Wigner matrices, torch.bmm, per-order Linear);
* segment softmax: PyTorch scatter_reduce(amax) / index_add, as torch_geometric's softmax.

Forward passes are timed alone; backward passes as repeated `backward(retain_graph=True)` on
one graph (what the Rust side times too). Every call is followed by a device synchronisation.

Usage: python kernels_reference.py [--device cpu|cuda] [--edges 10000,100000]
           [--ours bench-kernels-cuda0.json] [--out bench-kernels-reference-cuda.json]
With --ours, prints matscale / reference ratios per op (reference seconds / matscale seconds:
above 1 means matscale is faster). Needs torch and e3nn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from so2_torch import Layer, dense_wigner, random_blocks  # noqa: E402

CONFIGS = [(4, 2, 64), (6, 4, 128)]
EDGES_PER_NODE = 20
HEADS = 8


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, budget=0.5):
    for _ in range(3):  # e3nn generates code on its first calls: compare warm against warm
        fn()
    sync(device)
    samples = []
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < budget and len(samples) < 50):
        t = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2], samples[0], len(samples)


def layer_on(device, lmax, mmax, c):
    layer = Layer(lmax, mmax, c, c, extra=None, dtype=torch.float32).to(device)
    layer.to_m = layer.to_m.to(device)
    layer.mask = layer.mask.to(device)
    layer.rescale = layer.rescale.to(device)
    return layer


def run(device, edges_list):
    from e3nn import o3

    results = []

    def record(op, pass_, key, fn):
        median, best, reps = timed(device, fn)
        lmax, mmax, c, e = key
        results.append({"op": op, "pass": pass_, "lmax": lmax, "mmax": mmax, "channels": c,
                        "edges": e, "median_s": median, "min_s": best, "reps": reps})
        print(f"{op:<22} {pass_:<3} L{lmax} M{mmax} C{c:<4} E{e:<7} {median * 1e3:>10.3f} ms", flush=True)

    gen = torch.Generator().manual_seed(0)
    for lmax, mmax, c in CONFIGS:
        for e in edges_list:
            key = (lmax, mmax, c, e)
            xyz = torch.randn(e, 3, device=device, requires_grad=True)
            ls = list(range(lmax + 1))
            record("spherical_harmonics", "fwd", key,
                   lambda: o3.spherical_harmonics(ls, xyz, normalize=True, normalization="component"))
            y = o3.spherical_harmonics(ls, xyz, normalize=True, normalization="component").sum()
            record("spherical_harmonics", "bwd", key, lambda: y.backward(retain_graph=True))

            layer = layer_on(device, lmax, mmax, c)
            wig = dense_wigner(random_blocks(e, lmax, gen, torch.float32), lmax).to(device)
            wig_inv = wig.transpose(1, 2).contiguous()
            x = torch.randn(e, (lmax + 1) ** 2, c, device=device, requires_grad=True)
            rad = torch.randn(e, layer.rad_size(), device=device, requires_grad=True)
            x_trunc = torch.randn(e, len(layer.mask), c, device=device)
            record("rotate", "fwd", key, lambda: layer.rotate(wig, x))
            record("rotate_inv", "fwd", key, lambda: layer.rotate_inv(wig_inv, x_trunc))
            record("so2_layer", "fwd", key, lambda: layer(wig, wig_inv, x, rad))
            out = layer(wig, wig_inv, x, rad)[0].sum()
            record("so2_layer", "bwd", key, lambda: out.backward(retain_graph=True))

            nodes = max(1, e // EDGES_PER_NODE)
            index = (torch.arange(e, device=device) % nodes)
            logits = torch.randn(e, HEADS, device=device, requires_grad=True)

            def softmax():
                idx = index.unsqueeze(1).expand(-1, HEADS)
                mx = torch.full((nodes, HEADS), float("-inf"), device=device)
                mx = mx.scatter_reduce(0, idx, logits, reduce="amax", include_self=True)
                ex = (logits - mx.index_select(0, index)).exp()
                s = torch.zeros(nodes, HEADS, device=device).index_add(0, index, ex)
                return ex / (s.index_select(0, index) + 1e-16)

            record("segment_softmax", "fwd", key, softmax)
            sm = softmax().sum()
            record("segment_softmax", "bwd", key, lambda: sm.backward(retain_graph=True))
            del wig, wig_inv, x, rad, x_trunc, out, layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--edges", default="10000")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    import e3nn

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"reference on {name}: torch {torch.__version__}, e3nn {e3nn.__version__}", flush=True)
    edges = [int(v) for v in a.edges.split(",")]
    results = run(device, edges)
    out = a.out or f"bench-kernels-reference-{device.type}.json"
    meta = {"device": name, "torch": torch.__version__, "e3nn": e3nn.__version__, "python": sys.version.split()[0]}
    with open(out, "w") as f:
        json.dump({"meta": meta, "measurements": results}, f, indent=1)
    print(f"wrote {out}")
    if a.ours:
        with open(a.ours) as f:
            ours = json.load(f)["measurements"]
        index = {(m["op"], m["pass"], m["lmax"], m["mmax"], m["channels"], m["edges"]): m for m in ours}
        print(f"\n{'op':<22} {'pass':<4} {'config':<16} {'reference ms':>13} {'matscale ms':>12} {'ratio':>7}")
        for r in results:
            k = (r["op"], r["pass"], r["lmax"], r["mmax"], r["channels"], r["edges"])
            if k in index:
                m = index[k]
                cfg = f"L{r['lmax']}M{r['mmax']}C{r['channels']}E{r['edges']}"
                print(f"{r['op']:<22} {r['pass']:<4} {cfg:<16} {r['median_s'] * 1e3:>13.3f} "
                      f"{m['median_s'] * 1e3:>12.3f} {r['median_s'] / m['median_s']:>7.2f}")


if __name__ == "__main__":
    main()
