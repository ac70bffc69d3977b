"""PyTorch reference for matscale's rotate / SO(2) convolution / rotate_inv (fairchem 1.x semantics).

This is an independent re-implementation of what fairchem 1.x EquiformerV2 does per edge
(`SO3_Rotation.rotate`, `SO3_Embedding._m_primary`, `SO2_Convolution`, `SO2_Linear`,
`SO3_Embedding._l_primary`, `SO3_Rotation.rotate_inv`): the Wigner-D matrices are dense
[E, (lmax+1)^2, (lmax+1)^2] and every rotation is a `torch.bmm`, the layout changes are
einsums with a permutation matrix, exactly as the reference does them.

Two uses:

  python so2_torch.py fixture OUT.json   write the golden fixture (f64) that
                                         crates/equivariant/src/so2.rs tests against
  python so2_torch.py bench [--edges N] [--repeats R]
                                         time forward and forward+backward of
                                         rotate -> SO(2) conv -> rotate_inv at
                                         EquiformerV2 sizes (2 threads, f32, warm)
  python so2_torch.py compare [--edges N] [--repeats R] [--configs ...] [--threads T]
                             [--modes layer,gather]
                                         side by side, one configuration at a time:
                                         this PyTorch layer, then matscale's bench `so2`
                                         of the same configuration in its
                                         MATSCALE_BENCH_REPEATS mode (same statistics:
                                         best and median of R timed runs after warm-up,
                                         wall clock and process CPU time), then the table
                                         of ratios (torch / matscale)

Modes: `layer` is rotate -> SO(2) conv (C -> C) -> rotate_inv on per-edge inputs [E, K, C];
`gather` is EquiformerV2's message layer on node features [N, K, C] with N = E / 20:
index_select of the source and target rows + cat along channels ([E, K, 2C]) -> rotate ->
SO(2) conv (2C -> C) -> rotate_inv, matscale's `forward_gather_rotated`. Forward+backward is
out.backward(ones) with gradients for the (node or edge) input, the radial weights and every
parameter.

Versions used for the committed fixture and figures: torch 2.15.0, Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch


class Mapping:
    """fairchem `CoefficientMappingModule` for one resolution (lmax, mmax)."""

    def __init__(self, lmax: int, mmax: int):
        self.lmax, self.mmax = lmax, mmax
        ls, ms = [], []
        for l in range(lmax + 1):
            mm = min(mmax, l)
            for m in range(-mm, mm + 1):
                ls.append(l)
                ms.append(m)
        self.l_harmonic = torch.tensor(ls)
        self.m_complex = torch.tensor(ms)
        n = len(ls)
        to_m = torch.zeros(n, n, dtype=torch.float64)
        m_size = []
        row = 0
        for m in range(mmax + 1):
            pos = [i for i in range(n) if ms[i] == m]
            for i in pos:
                to_m[row, i] = 1.0
                row += 1
            m_size.append(len(pos))
            if m > 0:
                for i in range(n):
                    if ms[i] == -m:
                        to_m[row, i] = 1.0
                        row += 1
        self.to_m = to_m
        self.m_size = m_size

    def coefficient_idx(self, lmax: int, mmax: int) -> torch.Tensor:
        mask = (self.l_harmonic <= lmax) & (self.m_complex.abs() <= mmax)
        return torch.arange(len(mask))[mask]

    def rotate_inv_rescale(self, lmax: int, mmax: int, dtype) -> torch.Tensor:
        d = (lmax + 1) ** 2
        r = torch.ones(1, d, d, dtype=dtype)
        for l in range(lmax + 1):
            if l <= mmax:
                continue
            s = l * l
            r[:, s : s + 2 * l + 1, s : s + 2 * l + 1] = math.sqrt((2 * l + 1) / (2 * mmax + 1))
        return r[:, :, self.coefficient_idx(lmax, mmax)]


def dense_wigner(blocks: torch.Tensor, lmax: int) -> torch.Tensor:
    """[E, sum (2l+1)^2] row-major blocks -> dense block-diagonal [E, (lmax+1)^2, (lmax+1)^2]."""
    e = blocks.shape[0]
    d = (lmax + 1) ** 2
    out = torch.zeros(e, d, d, dtype=blocks.dtype)
    off = 0
    for l in range(lmax + 1):
        k = 2 * l + 1
        out[:, l * l : l * l + k, l * l : l * l + k] = blocks[:, off : off + k * k].reshape(e, k, k)
        off += k * k
    return out


def random_blocks(e: int, lmax: int, gen: torch.Generator, dtype) -> torch.Tensor:
    """Random orthogonal per-l blocks (QR of Gaussian matrices), flattened row-major."""
    parts = []
    for l in range(lmax + 1):
        k = 2 * l + 1
        q, r = torch.linalg.qr(torch.randn(e, k, k, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        parts.append(q.reshape(e, k * k))
    return torch.cat(parts, dim=1).to(dtype)


class Layer(torch.nn.Module):
    """rotate -> SO2_Convolution (or SO2_Linear) -> rotate_inv, fairchem style."""

    def __init__(self, lmax, mmax, c_in, c_out, extra=None, linear=False, dtype=torch.float32):
        super().__init__()
        self.lmax, self.mmax, self.c_out, self.extra, self.linear = lmax, mmax, c_out, extra, linear
        self.full = Mapping(lmax, lmax)
        self.red = Mapping(lmax, mmax)
        n0 = (lmax + 1) * c_in
        out0 = (lmax + 1) * c_out + (extra or 0)
        self.fc_m0 = torch.nn.Linear(n0, out0, dtype=dtype)
        self.fcs = torch.nn.ModuleList()
        for m in range(1, mmax + 1):
            k = (lmax - m + 1) * c_in
            n = (lmax - m + 1) * c_out * (1 if linear else 2)
            fc = torch.nn.Linear(k, n, bias=False, dtype=dtype)
            if not linear:
                fc.weight.data.mul_(1 / math.sqrt(2))
            self.fcs.append(fc)
        self.to_m = self.red.to_m.to(dtype)
        self.mask = self.full.coefficient_idx(lmax, mmax)
        self.rescale = self.full.rotate_inv_rescale(lmax, mmax, dtype)

    def rad_size(self):
        return self.fc_m0.in_features + sum(fc.in_features for fc in self.fcs)

    def rotate(self, wigner, x):
        return torch.bmm(wigner[:, self.mask, :], x)

    def rotate_inv(self, wigner_inv, y):
        w = wigner_inv[:, :, self.mask] * self.rescale
        return torch.bmm(w, y)

    def so2(self, x, rad):
        """x: [E, n_trunc, C] truncated l-major; returns (m-major out, m-major in, extra)."""
        e = x.shape[0]
        x = torch.einsum("nac, ba -> nbc", x, self.to_m)  # _m_primary
        x_mmajor = x
        out = []
        ms = self.red.m_size
        x0 = x.narrow(1, 0, ms[0]).reshape(e, -1)
        off_rad = 0
        if rad is not None:
            x0 = x0 * rad.narrow(1, 0, self.fc_m0.in_features)
        off_rad += self.fc_m0.in_features
        x0 = self.fc_m0(x0)
        extra = None
        if self.extra is not None:
            extra = x0.narrow(-1, 0, self.extra)
            x0 = x0.narrow(-1, self.extra, self.fc_m0.out_features - self.extra)
        out.append(x0.reshape(e, -1, self.c_out))
        off = ms[0]
        for m in range(1, self.mmax + 1):
            fc = self.fcs[m - 1]
            xm = x.narrow(1, off, 2 * ms[m]).reshape(e, 2, -1)
            if rad is not None:
                xm = xm * rad.narrow(1, off_rad, fc.in_features).reshape(e, 1, fc.in_features)
            xm = fc(xm)
            if not self.linear:
                h = fc.out_features // 2
                xr, xi = xm.narrow(2, 0, h), xm.narrow(2, h, h)
                xm = torch.cat((xr.narrow(1, 0, 1) - xi.narrow(1, 1, 1), xr.narrow(1, 1, 1) + xi.narrow(1, 0, 1)), dim=1)
            out.append(xm.reshape(e, -1, self.c_out))
            off += 2 * ms[m]
            off_rad += fc.in_features
        out_m = torch.cat(out, dim=1)
        out_l = torch.einsum("nac, ab -> nbc", out_m, self.to_m)  # _l_primary
        return out_l, out_m, x_mmajor, extra

    def forward(self, wigner, wigner_inv, x, rad):
        r = self.rotate(wigner, x)
        y, y_m, x_m, extra = self.so2(r, rad)
        return self.rotate_inv(wigner_inv, y), y_m, x_m, extra


def tolist(t):
    return t.detach().reshape(-1).tolist()


def fixture(path):
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(11)
    cases = []
    for name, lmax, mmax, c_in, c_out, extra, radial, linear in [
        ("conv_l3_m2_radial_extra", 3, 2, 3, 2, 2, True, False),
        ("conv_l2_m2_plain", 2, 2, 2, 3, None, False, False),
        ("conv_l4_m1_radial", 4, 1, 2, 2, None, True, False),
        ("linear_l3_m2_radial", 3, 2, 2, 3, None, True, True),
    ]:
        e = 3
        layer = Layer(lmax, mmax, c_in, c_out, extra, linear, dtype=torch.float64)
        blocks = random_blocks(e, lmax, gen, torch.float64)
        wig = dense_wigner(blocks, lmax)
        x = torch.randn(e, (lmax + 1) ** 2, c_in, generator=gen, dtype=torch.float64)
        rad = torch.randn(e, layer.rad_size(), generator=gen, dtype=torch.float64) if radial else None
        out, y_m, x_m, ex = layer(wig, wig.transpose(1, 2).contiguous(), x, rad)
        params = {"fc_m0.weight": tolist(layer.fc_m0.weight), "fc_m0.bias": tolist(layer.fc_m0.bias)}
        key = "so2_m_fc" if linear else "so2_m_conv"
        for i, fc in enumerate(layer.fcs):
            params[f"{key}.{i}.weight" if linear else f"{key}.{i}.fc.weight"] = tolist(fc.weight)
        cases.append(
            {
                "name": name, "lmax": lmax, "mmax": mmax, "edges": e, "c_in": c_in, "c_out": c_out,
                "extra": extra or 0, "linear": linear,
                "wigner_blocks": tolist(blocks), "x": tolist(x),
                "radial": tolist(rad) if radial else None,
                "params": params,
                "rotated_m_major": tolist(x_m), "so2_out_m_major": tolist(y_m),
                "extra_out": tolist(ex) if ex is not None else None,
                "out": tolist(out),
            }
        )
    meta = {"generator": "crates/equivariant/benches/so2_torch.py fixture", "torch": torch.__version__,
            "python": sys.version.split()[0]}
    with open(path, "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, separators=(",", ":"))


def bench(edges, repeats, configs):
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, edges {edges}, f32")
    results = {}
    for lmax, mmax, c in configs:
        results[(lmax, mmax, c)] = bench_one(edges, repeats, lmax, mmax, c, gen)
    return results


DEGREE = 20  # edges per node of the gathered benchmark, as in benches/so2.rs


def gather_index(edges):
    """The source/target rows of benches/so2.rs: edges grouped by target, sources spread."""
    n = max(1, -(-edges // DEGREE))
    e = torch.arange(edges)
    return n, (e * 7919 + 13) % n, torch.clamp(e // DEGREE, max=n - 1)


def bench_one(edges, repeats, lmax, mmax, c, gen, mode="layer"):
    """Best and median (wall, CPU) seconds of forward and forward+backward for one
    configuration; `mode` is "layer" (per-edge input) or "gather" (node input, messages
    gathered by index_select + cat)."""
    gather = mode == "gather"
    c_in = 2 * c if gather else c
    layer = Layer(lmax, mmax, c_in, c, extra=None, dtype=torch.float32)
    blocks = random_blocks(edges, lmax, gen, torch.float32)
    wig = dense_wigner(blocks, lmax)
    wig_inv = wig.transpose(1, 2).contiguous()
    if gather:
        n, src, dst = gather_index(edges)
        x = torch.randn(n, (lmax + 1) ** 2, c, generator=gen)
    else:
        x = torch.randn(edges, (lmax + 1) ** 2, c, generator=gen)
    rad = torch.randn(edges, layer.rad_size(), generator=gen)

    def run(xin, r):
        if gather:
            xin = torch.cat((xin.index_select(0, src), xin.index_select(0, dst)), dim=2)
        return layer(wig, wig_inv, xin, r)[0]

    res = {}
    for step in ("forward", "forward+backward"):
        times, cpu = [], []
        for it in range(repeats + 2):
            if step == "forward":
                t, tc = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    out = run(x, rad)
                dt, dc = time.perf_counter() - t, time.process_time() - tc
            else:
                xg = x.clone().requires_grad_(True)
                rg = rad.clone().requires_grad_(True)
                t, tc = time.perf_counter(), time.process_time()
                out = run(xg, rg)
                out.backward(torch.ones_like(out))
                dt, dc = time.perf_counter() - t, time.process_time() - tc
                layer.zero_grad(set_to_none=True)
            del out
            if it >= 2:
                times.append(dt)
                cpu.append(dc)
        times.sort()
        cpu.sort()
        res[step] = (times[0], times[len(times) // 2], cpu[0], cpu[len(cpu) // 2])
    f, b = res["forward"], res["forward+backward"]
    print(
        f"torch {mode} lmax={lmax} mmax={mmax} C={c}: forward best {f[0]*1e3:.1f} ms "
        f"median {f[1]*1e3:.1f} ms (CPU median {f[3]*1e3:.1f} ms); forward+backward best "
        f"{b[0]*1e3:.1f} ms median {b[1]*1e3:.1f} ms (CPU median {b[3]*1e3:.1f} ms)",
        flush=True,
    )
    return res


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def compare(edges, repeats, configs, threads=2, modes=("layer", "gather")):
    """PyTorch then matscale for each configuration in turn, then the ratio table."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    env = dict(os.environ, MATSCALE_BENCH_EDGES=str(edges), RAYON_NUM_THREADS=str(threads),
               MATSCALE_BENCH_REPEATS=str(repeats))
    subprocess.run(["cargo", "bench", "-p", "matscale-equivariant", "--bench", "so2", "--no-run"],
                   cwd=root, check=True, env=env)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (matscale: rayon {threads}), "
          f"edges {edges}, f32, best/median of {repeats}; load average {loadavg()}", flush=True)
    # The per-edge mode also times candle's own backward bookkeeping around the op (seed,
    # zero-filled gradient slots, adds: the `autograd_overhead` case), reported below the table.
    case_names = {"layer": ("forward", "forward_backward", "autograd_overhead"),
                  "gather": ("gather_forward", "gather_forward_backward")}
    rows = []
    for lmax, mmax, c in configs:
        for mode in modes:
            load_before = loadavg()
            t = bench_one(edges, repeats, lmax, mmax, c, gen, mode)
            cases = case_names[mode]
            out = subprocess.run(
                ["cargo", "bench", "-q", "-p", "matscale-equivariant", "--bench", "so2"],
                cwd=root, check=True, capture_output=True, text=True,
                env=dict(env, MATSCALE_BENCH_CONFIGS=f"{lmax},{mmax},{c}",
                         MATSCALE_BENCH_CASES=",".join(cases)),
            ).stdout
            ours = {}
            for line in out.splitlines():
                if line.startswith("RESULT "):
                    r = json.loads(line[len("RESULT "):])
                    ours[r["case"]] = (r["best"], r["median"], r["cpu_best"], r["cpu_median"])
                elif line.startswith("so2 "):
                    print("matscale " + line[4:], flush=True)
            rows.append((lmax, mmax, c, mode, t, ours[cases[0]], ours[cases[1]],
                         f"{load_before} → {loadavg()}", ours.get("autograd_overhead")))
    print()
    print(f"{edges} edges, {threads} thread(s); times best / median of {repeats}; ratio = torch / matscale "
          "(best / median, and of the median process CPU times)")
    print()
    print("| lmax / mmax / C | layer | torch fwd | matscale fwd | ratio (CPU) "
          "| torch fwd+bwd | matscale fwd+bwd | ratio (CPU) | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lmax, mmax, c, mode, t, f, b, load, _ in rows:
        tf, tb = t["forward"], t["forward+backward"]
        name = "per-edge" if mode == "layer" else "gather"
        print(
            f"| {lmax} / {mmax} / {c} | {name} | {tf[0]*1e3:.0f} / {tf[1]*1e3:.0f} ms "
            f"| {f[0]*1e3:.0f} / {f[1]*1e3:.0f} ms | **{tf[0]/f[0]:.2f}×** / {tf[1]/f[1]:.2f}× ({tf[3]/f[3]:.2f}×) "
            f"| {tb[0]*1e3:.0f} / {tb[1]*1e3:.0f} ms | {b[0]*1e3:.0f} / {b[1]*1e3:.0f} ms "
            f"| **{tb[0]/b[0]:.2f}×** / {tb[1]/b[1]:.2f}× ({tb[3]/b[3]:.2f}×) | {load} |"
        )
    for lmax, mmax, c, mode, t, f, b, load, a in rows:
        if a is None:
            continue
        tb = t["forward+backward"][0]
        print(f"\n{lmax} / {mmax} / {c} per-edge: candle's autograd bookkeeping outside the op "
              f"(seed, zero-filled slots, adds) {a[0]*1e3:.0f} ms of matscale's {b[0]*1e3:.0f} ms "
              f"forward+backward (best); the op and candle's graph walk alone: "
              f"{(b[0]-a[0])*1e3:.0f} ms, {tb/(b[0]-a[0]):.2f}× PyTorch's best (not the goal's ratio)")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture")
    f.add_argument("out")
    b = sub.add_parser("bench")
    b.add_argument("--edges", type=int, default=10_000)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--configs", default="4,2,64;4,2,128;6,4,64;6,4,128")
    c = sub.add_parser("compare")
    c.add_argument("--edges", type=int, default=10_000)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--configs", default="4,2,64;4,2,128;6,4,64;6,4,128")
    c.add_argument("--threads", type=int, default=2, help="torch threads and RAYON_NUM_THREADS")
    c.add_argument("--modes", default="layer,gather", help="layer (per-edge input), gather (node input)")
    a = p.parse_args()
    if a.cmd == "fixture":
        fixture(a.out)
    else:
        configs = [tuple(int(v) for v in s.split(",")) for s in a.configs.split(";")]
        if a.cmd == "bench":
            bench(a.edges, a.repeats, configs)
        else:
            compare(a.edges, a.repeats, configs, a.threads, tuple(a.modes.split(",")))


if __name__ == "__main__":
    main()
