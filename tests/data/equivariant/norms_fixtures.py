"""Golden values for crates/equivariant/src/{norms,radial,activation}.rs from fairchem's own modules.

Writes norms_golden.json (manifest + versions) and norms_golden.bin (little-endian float64 arrays)
beside this script, in the format read by `testing::Fixture`.

fairchem-core 1.x is not installed in the project venv (its dependencies do not resolve against
torch 2.15), so this script imports fairchem's module files directly from a source checkout:
`layer_norm.py`, `so3.py` (+ `wigner.py`), `activation.py`, `radial_function.py` from
`src/fairchem/core/models/equiformer_v2/` and `scn/smearing.py`. They only need torch and e3nn.
The checkout used: github.com/FAIR-Chem/fairchem commit 31c096399 (2025-04-15); these files are
unchanged there since tag fairchem_core-1.9.0 and are the 1.x EquiformerV2 code.

Usage: python3 norms_fixtures.py /path/to/fairchem
"""

import importlib.util
import json
import pathlib
import platform
import sys
import types

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
root = pathlib.Path(sys.argv[1]) / "src" / "fairchem" / "core" / "models"

# a throw-away package so that `from .wigner import wigner_D` inside so3.py resolves
pkg = types.ModuleType("eqv2")
pkg.__path__ = [str(root / "equiformer_v2")]
sys.modules["eqv2"] = pkg


def load(name, path):
    spec = importlib.util.spec_from_file_location(f"eqv2.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"eqv2.{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


layer_norm = load("layer_norm", root / "equiformer_v2" / "layer_norm.py")
load("wigner", root / "equiformer_v2" / "wigner.py")
so3 = load("so3", root / "equiformer_v2" / "so3.py")
activation = load("activation", root / "equiformer_v2" / "activation.py")
radial_function = load("radial_function", root / "equiformer_v2" / "radial_function.py")
smearing = load("smearing", root / "scn" / "smearing.py")

torch.set_default_dtype(torch.float64)
torch.manual_seed(20261125)
arrays = {}


def add(name, t):
    arrays[name] = t.detach().to(torch.float64).contiguous().numpy()


lmax, channels, n = 4, 6, 3
x = torch.randn(n, (lmax + 1) ** 2, channels) * 1.5
x[:, 0, :] += 0.7  # a non-zero channel mean on l = 0 makes centering matter
add("x", x)

for name in ["layer_norm", "layer_norm_sh", "rms_norm_sh"]:
    # fairchem's defaults: eps 1e-5, affine, 'component', std_balance_degrees and centering on
    norm = layer_norm.get_normalization_layer(name, lmax, channels)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    for pname, p in norm.named_parameters():
        add(f"{name}.{pname}", p)
    add(f"{name}.out", norm(x))


class Emb:  # the one attribute SO3_LinearV2 reads from an SO3_Embedding
    def __init__(self, e):
        self.embedding = e
        self.lmax_list = [lmax]
        self.device = e.device
        self.dtype = e.dtype


lin = so3.SO3_LinearV2(channels, 5, lmax)
with torch.no_grad():
    lin.bias.copy_(torch.randn_like(lin.bias))
add("so3_linear.weight", lin.weight)
add("so3_linear.bias", lin.bias)
add("so3_linear.out", lin(Emb(x)).embedding)

# Gaussian smearing as EquiformerV2 builds it, and the radial MLP
gs = smearing.GaussianSmearing(0.0, 12.0, 600, 2.0)
dist = torch.tensor([0.0, 0.5, 1.2345, 3.3, 7.77, 11.99, 12.0])
add("radial.dist", dist)
add("radial.smearing", gs(dist))
rf = radial_function.RadialFunction([8, 5, 5, 4])
with torch.no_grad():
    for p in rf.parameters():
        p.copy_(torch.randn_like(p))
rin = torch.randn(6, 8)
add("radial.mlp_in", rin)
for pname, p in rf.named_parameters():
    add(f"radial.{pname}", p)
add("radial.mlp_out", rf(rin))

# activations
a = torch.linspace(-12.0, 12.0, 97)
add("act.x", a)
add("act.smooth_leaky_relu", activation.SmoothLeakyReLU()(a))
add("act.scaled_smooth_leaky_relu", activation.ScaledSmoothLeakyReLU()(a))
add("act.scaled_silu", activation.ScaledSiLU()(a))

manifest = {
    "generator": "tests/data/equivariant/norms_fixtures.py",
    "fairchem_source": "github.com/FAIR-Chem/fairchem@31c096399 (equiformer_v2 files as in fairchem_core 1.9/1.10)",
    "versions": {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    },
    "arrays": [],
}
offset = 0
with open(HERE / "norms_golden.bin", "wb") as f:
    for name, arr in arrays.items():
        manifest["arrays"].append({"name": name, "shape": list(arr.shape), "offset": offset})
        f.write(arr.astype("<f8").tobytes())
        offset += arr.size
(HERE / "norms_golden.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"wrote {offset} float64 values in {len(arrays)} arrays")
