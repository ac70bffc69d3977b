"""Golden values for crates/equivariant/src/s2grid.rs from e3nn 0.6.0 and fairchem's SO3_Grid.

Writes s2grid_golden.json (manifest + versions) and s2grid_golden.bin (little-endian float64
arrays) beside this script, in the format read by `testing::Fixture`.

fairchem's `SO3_Grid`, `S2Activation` and `SeparableS2Activation` are imported from the module
files of a fairchem source checkout (see norms_fixtures.py for why and which commit); they build
their matrices with e3nn's `ToS2Grid` / `FromS2Grid`. Instead of the full matrices (too large
for a fixture) the script stores their action on a few random inputs, which pins every entry.

Usage: python3 s2grid_fixtures.py /path/to/fairchem
"""

import importlib.util
import json
import pathlib
import platform
import sys
import types

import e3nn
import numpy as np
import torch
from e3nn import o3
from e3nn.o3._s2grid import _quadrature_weights

HERE = pathlib.Path(__file__).resolve().parent
root = pathlib.Path(sys.argv[1]) / "src" / "fairchem" / "core" / "models" / "equiformer_v2"
pkg = types.ModuleType("eqv2")
pkg.__path__ = [str(root)]
sys.modules["eqv2"] = pkg


def load(name):
    spec = importlib.util.spec_from_file_location(f"eqv2.{name}", root / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"eqv2.{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


load("wigner")
so3 = load("so3")
activation = load("activation")

torch.set_default_dtype(torch.float64)
torch.manual_seed(7)
arrays = {}
cases = []


def add(name, t):
    arrays[name] = t.detach().to(torch.float64).contiguous().numpy()


# fairchem SO3_Grid(lmax, mmax, normalization="component", resolution) as EquiformerV2 builds it
for lmax, mmax, resolution in [(4, 4, 18), (4, 2, 18), (6, 6, None), (6, 4, 18)]:
    grid = so3.SO3_Grid(lmax, mmax, normalization="component", resolution=resolution)
    to_mat, from_mat = grid.to_grid_mat, grid.from_grid_mat  # [beta, alpha, K]
    rb, ra, k = to_mat.shape
    name = f"fairchem_l{lmax}_m{mmax}_r{rb}x{ra}"
    cases.append({"name": name, "lmax": lmax, "mmax": mmax, "res_beta": rb, "res_alpha": ra,
                  "normalization": "component"})
    coeffs = torch.randn(3, k)
    add(f"{name}.coeffs", coeffs)
    add(f"{name}.to_grid", torch.einsum("bai,zi->zba", to_mat, coeffs).reshape(3, rb * ra))
    signal = torch.randn(3, rb * ra)
    add(f"{name}.signal", signal)
    add(f"{name}.from_grid", torch.einsum("bai,zba->zi", from_mat, signal.reshape(3, rb, ra)))
    # the activations as fairchem's modules compute them, on [N, K, C] = [2, K, 3]
    table = {lmax: {mmax: grid}}
    x = torch.randn(2, k, 3)
    scalars = torch.randn(2, 3)
    add(f"{name}.act_x", x)
    add(f"{name}.act_scalars", scalars)
    add(f"{name}.s2_act", activation.S2Activation(lmax, mmax)(x, table))
    add(f"{name}.sep_s2_act", activation.SeparableS2Activation(lmax, mmax)(scalars, x, table))

# plain e3nn with the other normalisations (no mmax truncation), odd res_alpha
for lmax, rb, ra, norm in [(3, 8, 9, "integral"), (3, 8, 9, "norm")]:
    to = o3.ToS2Grid(lmax, (rb, ra), normalization=norm)
    fr = o3.FromS2Grid((rb, ra), lmax, normalization=norm)
    name = f"e3nn_l{lmax}_r{rb}x{ra}_{norm}"
    cases.append({"name": name, "lmax": lmax, "mmax": lmax, "res_beta": rb, "res_alpha": ra,
                  "normalization": norm})
    k = (lmax + 1) ** 2
    coeffs = torch.randn(3, k)
    add(f"{name}.coeffs", coeffs)
    add(f"{name}.to_grid", to(coeffs).reshape(3, rb * ra))
    signal = torch.randn(3, rb * ra)
    add(f"{name}.signal", signal)
    add(f"{name}.from_grid", fr(signal.reshape(3, rb, ra)))

add("quadrature_weights_b9", _quadrature_weights(9))  # res_beta = 18, before e3nn's rescale
betas, alphas = o3.s2_grid(18, 18)
add("betas_18", betas)
add("alphas_18", alphas)

manifest = {
    "generator": "tests/data/equivariant/s2grid_fixtures.py",
    "fairchem_source": "github.com/FAIR-Chem/fairchem@31c096399 (equiformer_v2 files as in fairchem_core 1.9/1.10)",
    "versions": {
        "e3nn": e3nn.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    },
    "cases": cases,
    "arrays": [],
}
offset = 0
with open(HERE / "s2grid_golden.bin", "wb") as f:
    for name, arr in arrays.items():
        manifest["arrays"].append({"name": name, "shape": list(arr.shape), "offset": offset})
        f.write(arr.astype("<f8").tobytes())
        offset += arr.size
(HERE / "s2grid_golden.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"wrote {offset} float64 values in {len(arrays)} arrays")
