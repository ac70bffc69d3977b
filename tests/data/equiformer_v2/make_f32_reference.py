"""fairchem's own float32 round-off on the parity fixture (crates/models/tests/equiformer_v2.rs).

Loads the model of parity.json / parity_weights.safetensors (written by make_parity_fixture.py)
into fairchem 1.x's EquiformerV2 modules and runs it on the fixture's structures, edges and
frame helpers twice: in float64 (which must reproduce parity.json) and in float32 (modules,
inputs and helpers cast with `.float()`, as a float32 fairchem run computes). The float32
outputs are what "parity in f32" can mean: the f64 reference differs from any f32 evaluation
by f32 round-off, which for the forces (small sums of large per-edge terms) is far above 1e-5.

Writes beside this script:
  parity_f32.json   fairchem's float32 energy [B], forces [N,3], stress [B,3,3], and its
                    relative errors against its own float64 outputs

Usage: python3 make_f32_reference.py /path/to/fairchem-checkout   (tag fairchem_core-1.9.0)
"""

import json
import pathlib
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

fixture = json.loads((HERE / "parity.json").read_text())


def read_safetensors(path):
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        arr = np.frombuffer(body[a:b], dtype="<f8").reshape(meta["shape"])
        out[name] = torch.tensor(arr.copy())
    return out


weights = read_safetensors(HERE / "parity_weights.safetensors")


def build(dtype):
    """fairchem's modules constructed with `dtype` as the default (their non-parameter
    tensors, such as the Wigner-D J matrices and the rescale masks, then share it) and the
    fixture's weights cast to it."""
    torch.set_default_dtype(dtype)
    backbone = eqv2.EquiformerV2Backbone(**fixture["config"])
    heads = {
        "energy": scalar.EqV2ScalarHead(backbone),
        "forces": vector.EqV2VectorHead(backbone),
        "stress": rank2.Rank2SymmetricTensorHead(
            backbone, decompose=True, use_source_target_embedding=True
        ),
    }
    modules = {"backbone": backbone, **{f"output_heads.{k}": v for k, v in heads.items()}}
    with torch.no_grad():
        for prefix, m in modules.items():
            m.to(dtype)
            m.eval()
            for name, p in m.named_parameters():
                p.copy_(weights[f"{prefix}.{name}"].to(dtype))
    torch.set_default_dtype(torch.float64)
    return backbone, heads


numbers, positions, batch_index, cells = [], [], [], []
for b, s in enumerate(fixture["structures"]):
    numbers += s["numbers"]
    positions += s["positions"]
    batch_index += [b] * len(s["numbers"])
    cells.append(np.array(s["cell"]))
pos_all = np.array(positions)
e = fixture["edges"]
vec_all = np.array(
    [
        pos_all[s] - pos_all[d] + np.array(sh) @ cells[batch_index[d]]
        for s, d, sh in zip(e["src"], e["dst"], e["shift"])
    ]
)


def run(dtype):
    backbone, heads = build(dtype)
    vec = torch.tensor(vec_all, dtype=dtype)
    helpers = torch.tensor(e["helper"], dtype=dtype)
    graph = types.SimpleNamespace(
        atomic_numbers_full=torch.tensor(numbers),
        batch_full=torch.tensor(batch_index),
        edge_index=torch.stack([torch.tensor(e["src"]), torch.tensor(e["dst"])]),
        edge_distance=vec.norm(dim=1),
        edge_distance_vec=vec,
        node_offset=0,
    )
    backbone.generate_graph = lambda *a, **k: graph
    data = types.SimpleNamespace(
        natoms=torch.tensor([len(s["numbers"]) for s in fixture["structures"]]),
        pos=torch.tensor(pos_all, dtype=dtype),
        atomic_numbers=torch.tensor(numbers),
        batch=torch.tensor(batch_index),
    )
    rand_like = torch.rand_like
    torch.rand_like = lambda x: helpers + 0.5
    torch.set_default_dtype(dtype)
    try:
        with torch.no_grad():
            emb = backbone(data)
            energy = heads["energy"](data, emb)["energy"]
            forces = heads["forces"](data, emb)["forces"]
            s = heads["stress"](data, emb)
    finally:
        torch.rand_like = rand_like
        torch.set_default_dtype(torch.float64)
    iso, aniso = s["stress_isotropic"].double(), s["stress_anisotropic"].double()
    irreps = torch.cat([iso, torch.zeros(len(iso), 3, dtype=torch.float64), aniso], dim=1)
    change_mat = heads["stress"].block.change_mat.to(torch.float64)
    stress = torch.einsum("ji,bi->bj", change_mat, irreps).reshape(-1, 3, 3)
    return energy.double().reshape(-1), forces.double(), stress


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


e64, f64, s64 = run(torch.float64)
ref = [torch.tensor(fixture[k]) for k in ("energy", "forces", "stress")]
check = [relative(x, r) for x, r in zip((e64, f64, s64), ref)]
assert max(check) < 1e-12, f"float64 rerun does not reproduce parity.json: {check}"
e32, f32, s32 = run(torch.float32)
errors = {
    "energy": relative(e32, e64),
    "forces": relative(f32, f64),
    "stress": relative(s32, s64),
}
out = {
    "generator": "make_f32_reference.py",
    "torch": torch.__version__,
    "float64_rerun_vs_parity_json": check,
    "relative_error_f32_vs_f64": errors,
    "energy": e32.tolist(),
    "forces": f32.tolist(),
    "stress": s32.tolist(),
}
(HERE / "parity_f32.json").write_text(json.dumps(out))
print("float64 rerun vs parity.json:", check)
print("fairchem float32 vs its float64 (relative to max |value|):", errors)
