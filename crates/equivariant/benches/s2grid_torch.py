"""PyTorch reference for benches/s2grid.rs and benches/segment.rs: the same computations the
fairchem 1.x EquiformerV2 way, on the CPU with 2 threads, timed warm.

* S2 activation (fairchem `S2Activation`): `einsum("bai,zic->zbac", to_grid_mat, x)`, SiLU,
  `einsum("bai,zbac->zic", from_grid_mat, grid)`, with the matrices of e3nn's ToS2Grid /
  FromS2Grid ('component') on an 18 × 18 grid truncated to |m| <= mmax as SO3_Grid does (the
  values do not matter for timing, the shapes do).
* Segment softmax (`torch_geometric.utils.softmax`): scatter-max, exp, scatter-sum via
  `index_add_`, divide; segment sum (`index_add_`, what fairchem's `_reduce_edge` does).

Usage: python3 crates/equivariant/benches/s2grid_torch.py [segment] [s2]
Prints one line per case: name, best and median seconds over the repetitions.
"""

import statistics
import sys
import time

import torch
from e3nn import o3

torch.set_num_threads(2)
torch.manual_seed(0)


def timeit(fn, reps=7, warm=2):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def grid_mats(lmax, mmax, res=18):
    to = o3.ToS2Grid(lmax, (res, res), normalization="component")
    fr = o3.FromS2Grid((res, res), lmax, normalization="component")
    to_mat = torch.einsum("mbi,am->bai", to.shb, to.sha)
    from_mat = torch.einsum("am,mbi->bai", fr.sha, fr.shb)
    keep = [l * l + m + l for l in range(lmax + 1) for m in range(-l, l + 1) if abs(m) <= mmax]
    return to_mat[:, :, keep].contiguous(), from_mat[:, :, keep].contiguous()


def s2_act(to_mat, from_mat, x):
    g = torch.einsum("bai,zic->zbac", to_mat, x)
    g = torch.nn.functional.silu(g)
    return torch.einsum("bai,zbac->zic", from_mat, g)


def bench_s2(n=10_000):
    for lmax, mmax, c in [(4, 2, 64), (4, 4, 128), (6, 4, 128), (6, 6, 128)]:
        to_mat, from_mat = grid_mats(lmax, mmax)
        k = to_mat.shape[-1]
        x = torch.randn(n, k, c)
        with torch.no_grad():
            best, med = timeit(lambda: s2_act(to_mat, from_mat, x))
        print(f"s2_act/fwd/l{lmax}_m{mmax}_c{c}_n{n} {best:.4f} {med:.4f}", flush=True)
        xg = x.clone().requires_grad_(True)

        def fwd_bwd():
            y = s2_act(to_mat, from_mat, xg)
            y.sum().backward()
            xg.grad = None

        best, med = timeit(fwd_bwd, reps=5)
        print(f"s2_act/fwd_bwd/l{lmax}_m{mmax}_c{c}_n{n} {best:.4f} {med:.4f}", flush=True)


def pyg_softmax(src, index, num_nodes):
    # torch_geometric.utils.softmax, written with plain torch (no torch_scatter wheel here)
    cols = src.shape[1:]
    idx = index.view(-1, *([1] * len(cols))).expand_as(src)
    src_max = torch.full((num_nodes, *cols), float("-inf")).scatter_reduce(0, idx, src.detach(), "amax", include_self=True)
    out = (src - src_max.index_select(0, index)).exp()
    out_sum = torch.zeros((num_nodes, *cols)).index_add_(0, index, out) + 1e-16
    return out / out_sum.index_select(0, index)


def bench_segment():
    for e, heads in [(10_000, 8), (100_000, 8)]:
        nodes = e // 20
        index = torch.randint(0, nodes, (e,)).sort().values
        x = torch.randn(e, heads)
        with torch.no_grad():
            best, med = timeit(lambda: pyg_softmax(x, index, nodes), reps=11)
        print(f"segment_softmax/fwd/e{e}_h{heads} {best:.5f} {med:.5f}", flush=True)
        xg = x.clone().requires_grad_(True)
        w = torch.randn(e, heads)

        def fwd_bwd():
            (pyg_softmax(xg, index, nodes) * w).sum().backward()
            xg.grad = None

        best, med = timeit(fwd_bwd, reps=11)
        print(f"segment_softmax/fwd_bwd/e{e}_h{heads} {best:.5f} {med:.5f}", flush=True)
    for e, width in [(10_000, 25 * 64), (100_000, 128)]:
        nodes = e // 20
        index = torch.randint(0, nodes, (e,)).sort().values
        x = torch.randn(e, width)
        best, med = timeit(lambda: torch.zeros(nodes, width).index_add_(0, index, x), reps=11)
        print(f"segment_sum/fwd/e{e}_w{width} {best:.5f} {med:.5f}", flush=True)


if __name__ == "__main__":
    which = sys.argv[1:] or ["segment", "s2"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "segment" in which:
        bench_segment()
    if "s2" in which:
        bench_s2()
