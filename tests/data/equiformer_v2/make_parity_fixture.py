"""Parity fixture for crates/models/src/equiformer_v2 from fairchem's own EquiformerV2 code.

Builds fairchem 1.x `EquiformerV2Backbone` with `EqV2ScalarHead` (energy), `EqV2VectorHead`
(forces) and `Rank2SymmetricTensorHead(decompose=True, use_source_target_embedding=True)`
(stress) -- the OMat24 model -- at a small size, perturbs every parameter, and runs it in
float64 on two small periodic structures with a fixed edge list and fixed frame helpers.

Writes beside this script:
  parity_weights.safetensors  every parameter (F64) under matscale's names
                              (`backbone.…`, `output_heads.{energy,forces,stress}.…`)
  parity.json                 config, versions, structures, edges (src, dst, shift, helper),
                              outputs (energy [B], forces [N,3], stress [B,3,3],
                              stress_isotropic, stress_anisotropic)

fairchem-core 1.x does not install against the project venv's torch, so its module files are
imported from a source checkout through fairchem_stubs.py (stand-ins for the few helpers
outside the model's math that they import).

Usage: python3 make_parity_fixture.py /path/to/fairchem-checkout   (tag fairchem_core-1.9.0)
"""

import json
import pathlib
import platform
import struct
import sys
import types

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent


sys.path.insert(0, str(HERE))
import fairchem_stubs  # noqa: E402

eqv2, scalar, vector, rank2 = fairchem_stubs.load(sys.argv[1])

torch.set_default_dtype(torch.float64)
torch.manual_seed(20261126)
rng = np.random.default_rng(20261126)

CONFIG = dict(
    num_layers=2,
    sphere_channels=4,
    attn_hidden_channels=3,
    num_heads=2,
    attn_alpha_channels=2,
    attn_value_channels=3,
    ffn_hidden_channels=5,
    edge_channels=3,
    norm_type="layer_norm_sh",
    lmax_list=[4],
    mmax_list=[2],
    grid_resolution=18,
    max_radius=5.0,
    max_num_elements=30,
    avg_num_nodes=31.17,
    avg_degree=61.95,
    attn_activation="silu",
    ffn_activation="silu",
    use_grid_mlp=True,
    use_sep_s2_act=True,
    use_attn_renorm=True,
    alpha_drop=0.1,
    drop_path_rate=0.1,
    weight_init="uniform",
    max_neighbors=20,
)

backbone = eqv2.EquiformerV2Backbone(**CONFIG)
heads = {
    "energy": scalar.EqV2ScalarHead(backbone),
    "forces": vector.EqV2VectorHead(backbone),
    "stress": rank2.Rank2SymmetricTensorHead(
        backbone, decompose=True, use_source_target_embedding=True
    ),
}
modules = {"backbone": backbone, **{f"output_heads.{k}": v for k, v in heads.items()}}
for m in modules.values():
    m.eval()

# Perturb every parameter so that zero biases and unit norms are exercised too.
params = {}
with torch.no_grad():
    for prefix, m in modules.items():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
            params[f"{prefix}.{name}"] = p.detach().clone()


# Two small periodic structures (Cu, Ni, Al, O) with every pair within the cutoff as an edge.
def structure(n_atoms):
    a = 4.2 + 0.4 * rng.random()
    cell = np.array(
        [[a, 0, 0], [0.3 * rng.random(), a, 0], [0.2 * rng.random(), 0.3 * rng.random(), a]]
    )
    frac = np.array(
        [[(k % 2) * 0.5, ((k // 2) % 2) * 0.5, (k // 4) * 0.5] for k in range(n_atoms)]
    ) + 0.12 * rng.random((n_atoms, 3))
    numbers = rng.choice([29, 28, 13, 8], size=n_atoms)
    return numbers, frac @ cell, cell


def edges(pos, cell, cutoff):
    out = []
    n = len(pos)
    r = 3
    for dst in range(n):
        for src in range(n):
            for s in np.ndindex(2 * r + 1, 2 * r + 1, 2 * r + 1):
                shift = np.array(s) - r
                vec = pos[src] - pos[dst] + shift @ cell
                d = np.linalg.norm(vec)
                if 1e-8 < d < cutoff:
                    out.append((src, dst, shift))
    return out


structures = [structure(5), structure(4)]
numbers, positions, batch_index, edge_list = [], [], [], []
offset = 0
for b, (z, pos, cell) in enumerate(structures):
    numbers += list(z)
    positions.append(pos)
    batch_index += [b] * len(z)
    for src, dst, shift in edges(pos, cell, CONFIG["max_radius"]):
        edge_list.append((src + offset, dst + offset, shift, b))
    offset += len(z)
pos_all = np.concatenate(positions)
src = torch.tensor([e[0] for e in edge_list])
dst = torch.tensor([e[1] for e in edge_list])
vec = torch.tensor(
    np.array(
        [
            pos_all[e[0]] - pos_all[e[1]] + e[2] @ structures[e[3]][2]
            for e in edge_list
        ]
    )
)
helpers = torch.rand(len(edge_list), 3) - 0.5

graph = types.SimpleNamespace(
    atomic_numbers_full=torch.tensor(numbers),
    batch_full=torch.tensor(batch_index),
    edge_index=torch.stack([src, dst]),
    edge_distance=vec.norm(dim=1),
    edge_distance_vec=vec,
    node_offset=0,
)
backbone.generate_graph = lambda *a, **k: graph
data = types.SimpleNamespace(
    natoms=torch.tensor([len(s[0]) for s in structures]),
    pos=torch.tensor(pos_all),
    atomic_numbers=torch.tensor(numbers),
    batch=torch.tensor(batch_index),
)

rand_like = torch.rand_like
torch.rand_like = lambda x: helpers + 0.5  # the frame helpers fairchem draws
with torch.no_grad():
    emb = backbone(data)
torch.rand_like = rand_like
with torch.no_grad():
    energy = heads["energy"](data, emb)["energy"]
    forces = heads["forces"](data, emb)["forces"]
    s = heads["stress"](data, emb)
iso, aniso = s["stress_isotropic"], s["stress_anisotropic"]
irreps = torch.cat([iso, torch.zeros(len(iso), 3), aniso], dim=1)
change_mat = heads["stress"].block.change_mat.to(torch.float64)
stress = torch.einsum("ji,bi->bj", change_mat, irreps).reshape(-1, 3, 3)


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        b = t.detach().to(torch.float64).contiguous().numpy().astype("<f8").tobytes()
        header[name] = {"dtype": "F64", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


write_safetensors(HERE / "parity_weights.safetensors", params)
import e3nn  # noqa: E402

fixture = {
    "generator": "make_parity_fixture.py",
    "versions": {
        "fairchem": "fairchem_core-1.9.0 (module files, github.com/FAIR-Chem/fairchem)",
        "torch": torch.__version__,
        "e3nn": e3nn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    },
    "config": CONFIG,
    "n_parameters": sum(p.numel() for p in params.values()),
    "structures": [
        {"numbers": [int(x) for x in z], "positions": pos.tolist(), "cell": cell.tolist()}
        for z, pos, cell in structures
    ],
    "edges": {
        "src": src.tolist(),
        "dst": dst.tolist(),
        "shift": [e[2].tolist() for e in edge_list],
        "helper": helpers.tolist(),
    },
    "energy": energy.tolist(),
    "forces": forces.tolist(),
    "stress": stress.tolist(),
    "stress_isotropic": iso.reshape(-1).tolist(),
    "stress_anisotropic": aniso.tolist(),
}
(HERE / "parity.json").write_text(json.dumps(fixture))
print(f"{len(params)} tensors, {fixture['n_parameters']} parameters, {len(edge_list)} edges")
print("energy", energy.tolist())
