"""Parameter counts of the study's ADiT model layout, built with PyTorch modules.

Re-creates the module structure of the study's `omat24/models/adit.py`
(akshaytrikha/materials-scaling, d5fef67): atom-type embedding, two coordinate embedders
(Linear(3, d, no bias), SiLU, Linear(d, d)), a pre-norm `nn.TransformerEncoder` with GELU,
ff = 4 d and a final LayerNorm, and three output MLPs Linear(d, d)-SiLU-Linear(d, 128)-SiLU-
Linear(128, out) for energy (1), forces (3) and stress (6). Writes the total count and the
study's count (every parameter whose name holds an embedder excluded) for the study's sizes.

Run: python3 make_parameter_counts.py > parameter_counts.json
"""

import json

import torch
from torch import nn


def mlp(d, out, hidden=128):
    return nn.Sequential(
        nn.Linear(d, d), nn.SiLU(), nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, out)
    )


def embedder(d):
    return nn.Sequential(nn.Linear(3, d, bias=False), nn.SiLU(), nn.Linear(d, d))


def model(max_num_elements, d_model, nhead, num_layers):
    layer = nn.TransformerEncoderLayer(
        d_model=d_model,
        nhead=nhead,
        dim_feedforward=4 * d_model,
        activation=nn.GELU(approximate="tanh"),
        dropout=0.1,
        batch_first=True,
        norm_first=True,
        bias=True,
    )
    return nn.ModuleDict(
        {
            "atom_type_embedder": nn.Embedding(max_num_elements, d_model),
            "pos_embedder": embedder(d_model),
            "frac_coords_embedder": embedder(d_model),
            "transformer": nn.TransformerEncoder(
                layer, num_layers=num_layers, norm=nn.LayerNorm(d_model),
                enable_nested_tensor=False,
            ),
            "energy_head": mlp(d_model, 1),
            "force_head": mlp(d_model, 3),
            "stress_head": mlp(d_model, 6),
        }
    )


SIZES = [  # d_model, nhead, num_layers: the study's ADiT grid
    (16, 1, 2), (64, 1, 2), (64, 1, 3), (96, 1, 3), (128, 2, 4),
    (192, 3, 5), (192, 4, 6), (256, 4, 6), (320, 5, 7),
]

rows = []
for max_num_elements in (100, 119):
    for d, h, l in SIZES:
        m = model(max_num_elements, d, h, l)
        total = sum(p.numel() for p in m.parameters())
        study = sum(
            p.numel()
            for name, p in m.named_parameters()
            if "atom_type_embedder" not in name
            and "pos_embedder" not in name
            and "frac_coords_embedder" not in name
        )
        rows.append(
            {"max_num_elements": max_num_elements, "d_model": d, "nhead": h,
             "num_layers": l, "total": total, "study_rule": study}
        )
print(json.dumps(rows, indent=1))
