"""Golden values for matscale-equivariant's spherical harmonics and Wigner-D (sh.rs, wigner.rs).

Writes sh_wigner_e3nn.json (manifest + metadata) and sh_wigner_e3nn.bin (the arrays as
little-endian float64, concatenated in manifest order). Run from anywhere:

    python3 tests/data/equivariant/make_sh_wigner_fixtures.py
"""
import json
import math
import pathlib
import sys

import e3nn
import numpy as np
import torch
from e3nn import o3

torch.set_default_dtype(torch.float64)
HERE = pathlib.Path(__file__).resolve().parent
arrays = []  # (name, np.ndarray)


def add(name, t):
    arrays.append((name, np.ascontiguousarray(np.asarray(t, dtype="<f8"))))


gen = torch.Generator().manual_seed(20261125)
# Spherical harmonics inputs: random directions with random lengths in [0.2, 2.5], the six
# axis directions, and the zero vector (e3nn's normalize maps it to 0, giving Y_0 = 1 only).
n_random = 193
v = torch.randn(n_random, 3, generator=gen)
v = v / v.norm(dim=1, keepdim=True) * (0.2 + 2.3 * torch.rand(n_random, 1, generator=gen))
axes = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [0, 0, 0]])
xyz = torch.cat([v, axes])
add("sh_xyz", xyz)
LMAX = 8
ls = list(range(LMAX + 1))
# Full set for the convention that matters (component); smaller sets for the other options.
add("sh_l8_component_normalized", o3.spherical_harmonics(ls, xyz, True, "component"))
few = xyz[:16]
add("sh_l8_component_raw", o3.spherical_harmonics(ls, few, False, "component"))
add("sh_l8_norm_normalized", o3.spherical_harmonics(ls, few, True, "norm"))
add("sh_l8_norm_raw", o3.spherical_harmonics(ls, few, False, "norm"))
add("sh_l8_integral_normalized", o3.spherical_harmonics(ls, few, True, "integral"))
add("sh_l8_integral_raw", o3.spherical_harmonics(ls, few, False, "integral"))
add("sh_l11_component_normalized", o3.spherical_harmonics(list(range(12)), xyz[:8], True, "component"))
# Gradient of sum(Y * w) with respect to the raw vectors (normalize=True and False, l ≤ 6).
w = torch.randn(16, 49, generator=gen)
add("sh_grad_weights", w)
for normalize in (True, False):
    x = xyz[:16].clone().requires_grad_(True)
    (o3.spherical_harmonics(list(range(7)), x, normalize, "component") * w).sum().backward()
    add(f"sh_grad_l6_{'normalized' if normalize else 'raw'}", x.grad)

# Wigner-D: rotations, e3nn angles, and D^l for l ≤ 11 (blocks concatenated, row-major).
WLMAX = 11
torch.manual_seed(7)
rots = o3.rand_matrix(2)
# Also a rotation with beta = 0 (pole) to exercise the angle extraction there.
rots = torch.cat([rots, o3.angles_to_matrix(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.7]))])
add("wigner_rotations", rots)
a, b, c = o3.matrix_to_angles(rots)
add("wigner_angles", torch.stack([a, b, c], dim=1))
add("wigner_blocks_l11", torch.stack(
    [torch.cat([o3.wigner_D(l, a[i], b[i], c[i]).reshape(-1) for l in range(WLMAX + 1)]) for i in range(len(rots))]
))
half = torch.tensor(math.pi / 2)
add("wigner_j_l11", torch.cat([((-1) ** l * o3.wigner_D(l, half, half, half)).reshape(-1) for l in range(WLMAX + 1)]))

# Edge frames: fairchem 1.x's recipe (init_edge_rot_mat: helper vector h = rand - 0.5,
# normalised; its 90-degree turns h_b = (-h_y, h_x, h_z), h_c = (h_x, -h_z, h_y) replace it when
# less aligned with the edge; rows of the frame (z, x, -y) with z = x cross h, y = x cross z),
# restated here with torch, then the blocks via e3nn's matrix_to_angles and wigner_D.
n_edges = 12
edge_vec = torch.randn(n_edges, 3, generator=gen) * 2.0
edge_vec[0] = torch.tensor([0.0, 1.5, 0.0])  # along +y
edge_vec[1] = torch.tensor([0.0, -0.7, 0.0])  # along -y
helpers = torch.rand(n_edges, 3, generator=gen) - 0.5
helpers[2] = edge_vec[2] / edge_vec[2].norm() * 0.4  # helper parallel to its edge
ex = edge_vec / edge_vec.norm(dim=1, keepdim=True)
h = helpers / helpers.norm(dim=1, keepdim=True)
hb = torch.stack([-h[:, 1], h[:, 0], h[:, 2]], dim=1)
hc = torch.stack([h[:, 0], -h[:, 2], h[:, 1]], dim=1)
dot = lambda a, b: (a * b).sum(dim=1, keepdim=True).abs()
h = torch.where(dot(h, ex) > dot(hb, ex), hb, h)
h = torch.where(dot(h, ex) > dot(hc, ex), hc, h)
ez = torch.linalg.cross(ex, h, dim=1)
ez = ez / ez.norm(dim=1, keepdim=True)
ey = torch.linalg.cross(ex, ez, dim=1)
ey = ey / ey.norm(dim=1, keepdim=True)
rot = torch.stack([ez, ex, -ey], dim=1)  # rows
add("frames_edge_vec", edge_vec)
add("frames_helpers", helpers)
add("frames_rot_mat", rot)
fa, fb, fc = o3.matrix_to_angles(rot)
add("frames_blocks_l4", torch.stack(
    [torch.cat([o3.wigner_D(l, fa[i], fb[i], fc[i]).reshape(-1) for l in range(5)]) for i in range(n_edges)]
))

manifest = {
    "generator": "tests/data/equivariant/make_sh_wigner_fixtures.py",
    "versions": {"e3nn": e3nn.__version__, "torch": torch.__version__, "numpy": np.__version__,
                 "python": sys.version.split()[0]},
    "arrays": [],
}
offset = 0
with open(HERE / "sh_wigner_e3nn.bin", "wb") as f:
    for name, arr in arrays:
        manifest["arrays"].append({"name": name, "shape": list(arr.shape), "offset": offset})
        f.write(arr.tobytes())
        offset += arr.size
(HERE / "sh_wigner_e3nn.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"wrote {offset} float64 values in {len(arrays)} arrays")
