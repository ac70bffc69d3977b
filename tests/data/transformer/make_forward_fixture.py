"""Forward-pass fixture of the study's ADiT model, computed with PyTorch modules.

Builds the study's layout (omat24/models/adit.py in akshaytrikha/materials-scaling, d5fef67)
from PyTorch modules in float64: atom-type embedding, Cartesian and fractional-coordinate
embedders Linear(3, d, no bias)-SiLU-Linear(d, d), ADiT's sinusoidal atom-index embedding,
a pre-norm nn.TransformerEncoder (GELU tanh, ff = 4 d, final LayerNorm) on structures padded
with a key padding mask, and MLP heads Linear(d, d)-SiLU-Linear(d, h)-SiLU-Linear(h, out):
energy = sum of per-atom outputs, forces per atom, stress = mean of per-atom Voigt outputs
(xx, yy, zz, yz, xz, xy). Fractional coordinates are wrapped into [0, 1) as ASE's
get_scaled_positions() does. Weights are random (seeded) and written under matscale's names.

Run: python3 make_forward_fixture.py > forward.json
"""

import json
import math

import numpy as np
import torch
from torch import nn

torch.manual_seed(0)
torch.backends.mha.set_fastpath_enabled(False)
torch.set_default_dtype(torch.float64)

D, HEADS, LAYERS, HIDDEN, ELEMENTS = 8, 2, 2, 16, 20


def mlp(d, out):
    return nn.Sequential(
        nn.Linear(d, d), nn.SiLU(), nn.Linear(d, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, out)
    )


def embedder(d):
    return nn.Sequential(nn.Linear(3, d, bias=False), nn.SiLU(), nn.Linear(d, d))


atom_embedding = nn.Embedding(ELEMENTS, D)
pos_embedder, frac_embedder = embedder(D), embedder(D)
encoder = nn.TransformerEncoder(
    nn.TransformerEncoderLayer(
        D, HEADS, dim_feedforward=4 * D, dropout=0.0, activation=nn.GELU(approximate="tanh"),
        batch_first=True, norm_first=True, bias=True,
    ),
    num_layers=LAYERS,
    norm=nn.LayerNorm(D),
    enable_nested_tensor=False,
)
heads = {"energy_head": mlp(D, 1), "force_head": mlp(D, 3), "stress_head": mlp(D, 6)}
modules = [atom_embedding, pos_embedder, frac_embedder, encoder, *heads.values()]
with torch.no_grad():
    for m in modules:
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.4 * torch.randn_like(p))
for m in modules:
    m.eval()

# Our names for the weights.
weights = {"atom_embedding.weight": atom_embedding.weight}
for prefix, m in (("pos_embedder", pos_embedder), ("frac_embedder", frac_embedder)):
    for name, p in m.named_parameters():
        weights[f"{prefix}.{name}"] = p
for l, layer in enumerate(encoder.layers):
    b = f"blocks.{l}"
    weights[f"{b}.attn.in_proj.weight"] = layer.self_attn.in_proj_weight
    weights[f"{b}.attn.in_proj.bias"] = layer.self_attn.in_proj_bias
    weights[f"{b}.attn.out_proj.weight"] = layer.self_attn.out_proj.weight
    weights[f"{b}.attn.out_proj.bias"] = layer.self_attn.out_proj.bias
    for ours, theirs in (("ff.linear1", layer.linear1), ("ff.linear2", layer.linear2),
                         ("norm1", layer.norm1), ("norm2", layer.norm2)):
        weights[f"{b}.{ours}.weight"] = theirs.weight
        weights[f"{b}.{ours}.bias"] = theirs.bias
weights["norm.weight"] = encoder.norm.weight
weights["norm.bias"] = encoder.norm.bias
for prefix, m in heads.items():
    for name, p in m.named_parameters():
        weights[f"{prefix}.{name}"] = p

structures = [
    {
        "numbers": [8, 13, 14],
        "cell": [[3.1, 0.0, 0.0], [0.4, 2.9, 0.0], [-0.3, 0.5, 3.3]],
        "positions": [[0.1, 0.2, 0.3], [1.6, -0.4, 1.2], [2.9, 2.5, 3.6]],
    },
    {
        "numbers": [1, 6, 7, 8, 19],
        "cell": [[4.0, 0.2, 0.1], [0.0, 4.2, -0.3], [0.5, 0.0, 3.9]],
        "positions": [[0.0, 0.0, 0.0], [1.1, 2.0, 0.5], [-0.7, 3.3, 2.2],
                      [3.0, 1.0, 4.1], [2.2, 2.2, 1.9]],
    },
]


def index_embedding(n, d, max_len=2048):
    t = torch.arange(n, dtype=torch.float64)[:, None]
    k = torch.arange(d // 2, dtype=torch.float64)[None]
    angle = t * math.pi / (max_len ** (2 * k / d))
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


tokens, sizes = [], []
for s in structures:
    pos = torch.tensor(s["positions"])
    cell = np.array(s["cell"])
    frac = np.array(s["positions"]) @ np.linalg.inv(cell)
    frac %= 1.0
    frac %= 1.0
    with torch.no_grad():
        x = atom_embedding(torch.tensor(s["numbers"]))
        x = x + pos_embedder(pos) + frac_embedder(torch.tensor(frac))
        x = x + index_embedding(len(s["numbers"]), D)
    tokens.append(x)
    sizes.append(len(s["numbers"]))
width = max(sizes)
padded = torch.zeros(len(structures), width, D)
mask = torch.ones(len(structures), width, dtype=torch.bool)  # True = padding
for i, x in enumerate(tokens):
    padded[i, : sizes[i]] = x
    mask[i, : sizes[i]] = False
with torch.no_grad():
    out = encoder(padded, src_key_padding_mask=mask)
    energy, forces, stress = [], [], []
    for i, n in enumerate(sizes):
        h = out[i, :n]
        energy.append(heads["energy_head"](h).sum().item())
        forces.extend(heads["force_head"](h).tolist())
        xx, yy, zz, yz, xz, xy = heads["stress_head"](h).mean(0).tolist()
        stress.append([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])

fixture = {
    "config": {"d_model": D, "heads": HEADS, "depth": LAYERS, "head_hidden": HIDDEN,
               "max_atomic_number": ELEMENTS},
    "weights": {k: {"shape": list(v.shape), "data": v.detach().flatten().tolist()}
                for k, v in weights.items()},
    "structures": structures,
    "energy": energy,
    "forces": forces,
    "stress": stress,
}
print(json.dumps(fixture))
