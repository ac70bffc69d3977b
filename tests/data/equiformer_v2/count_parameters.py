"""Parameter counts of fairchem 1.x EquiformerV2 models, by component, from fairchem's own code.

Builds `EquiformerV2Backbone` + `EqV2ScalarHead` + `EqV2VectorHead` +
`Rank2SymmetricTensorHead(decompose=True, use_source_target_embedding=True)` (the OMat24
HydraModel) for the OMat24 eqV2-S/M/L configurations and the 20 sizes of the scaling study
(Trikha et al., akshaytrikha/materials-scaling omat24/models/equiformer_v2.py), counts
`named_parameters()` per component and the study's count (every parameter whose name does not
contain "embedding"), and writes parameter_counts.json beside this script.

Usage: python3 count_parameters.py /path/to/fairchem-checkout   (tag fairchem_core-1.9.0)
"""

import json
import pathlib
import platform
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fairchem_stubs  # noqa: E402

eqv2, scalar, vector, rank2 = fairchem_stubs.load(sys.argv[1])

# OMat24 eqV2 settings shared by every model here.
BASE = dict(
    max_neighbors=20,
    max_radius=12.0,
    max_num_elements=96,
    norm_type="layer_norm_sh",
    lmax_list=[4],
    mmax_list=[2],
    grid_resolution=18,
    num_sphere_samples=128,
    edge_channels=128,
    use_atom_edge_embedding=True,
    share_atom_edge_embedding=False,
    use_m_share_rad=False,
    distance_function="gaussian",
    num_distance_basis=512,
    attn_activation="silu",
    use_s2_act_attn=False,
    use_attn_renorm=True,
    ffn_activation="silu",
    use_gate_act=False,
    use_grid_mlp=True,
    use_sep_s2_act=True,
    alpha_drop=0.1,
    drop_path_rate=0.1,
    proj_drop=0.0,
    weight_init="uniform",
    avg_num_nodes=31.17,
    avg_degree=61.95,
)
EQV2_S = dict(
    num_layers=8,
    sphere_channels=128,
    attn_hidden_channels=64,
    num_heads=8,
    attn_alpha_channels=64,
    attn_value_channels=16,
    ffn_hidden_channels=128,
)
CONFIGS = {
    "eqv2-s": EQV2_S,
    "eqv2-m": {**EQV2_S, "num_layers": 10, "lmax_list": [6], "mmax_list": [4]},
    "eqv2-l": {**EQV2_S, "num_layers": 20, "lmax_list": [6], "mmax_list": [3]},
}
# The study's grid: layers / sphere = edge channels / ffn hidden / attn hidden = alpha
# channels / heads / value channels.
STUDY = [
    (1, 1, 1, 1, 1, 1), (2, 1, 1, 2, 1, 1), (2, 2, 2, 4, 1, 1), (2, 3, 3, 4, 1, 1),
    (2, 3, 3, 8, 1, 2), (3, 3, 3, 8, 1, 2), (3, 4, 4, 8, 1, 2), (4, 5, 5, 8, 1, 2),
    (4, 10, 6, 8, 1, 2), (4, 12, 8, 10, 1, 2), (4, 12, 10, 12, 1, 3), (4, 16, 12, 12, 1, 3),
    (4, 16, 16, 16, 1, 4), (4, 18, 18, 20, 1, 5), (4, 24, 24, 24, 2, 6), (5, 36, 36, 32, 3, 8),
    (6, 48, 48, 32, 4, 8), (6, 64, 64, 32, 5, 8), (6, 72, 72, 32, 6, 8), (6, 96, 96, 40, 7, 10),
]
for k, (layers, sphere, ffn, attn, heads, value) in enumerate(STUDY):
    CONFIGS[f"study-{k + 1:02}"] = dict(
        num_layers=layers,
        sphere_channels=sphere,
        edge_channels=sphere,
        ffn_hidden_channels=ffn,
        attn_hidden_channels=attn,
        attn_alpha_channels=attn,
        num_heads=heads,
        attn_value_channels=value,
    )


def count(config):
    backbone = eqv2.EquiformerV2Backbone(**{**BASE, **config})
    heads = {
        "energy": scalar.EqV2ScalarHead(backbone),
        "forces": vector.EqV2VectorHead(backbone),
        "stress": rank2.Rank2SymmetricTensorHead(
            backbone, decompose=True, use_source_target_embedding=True
        ),
    }
    named = [(f"backbone.{n}", p.numel()) for n, p in backbone.named_parameters()]
    for h, m in heads.items():
        named += [(f"output_heads.{h}.{n}", p.numel()) for n, p in m.named_parameters()]

    def total(pred):
        return sum(n for name, n in named if pred(name))

    return {
        "config": config,
        "total": total(lambda n: True),
        "backbone": total(lambda n: n.startswith("backbone.")),
        "sphere_embedding": total(lambda n: n.startswith("backbone.sphere_embedding")),
        "edge_degree_embedding": total(lambda n: n.startswith("backbone.edge_degree_embedding")),
        "block_0": total(lambda n: n.startswith("backbone.blocks.0.")),
        "final_norm": total(lambda n: n.startswith("backbone.norm.")),
        "energy_head": total(lambda n: n.startswith("output_heads.energy.")),
        "force_head": total(lambda n: n.startswith("output_heads.forces.")),
        "stress_head": total(lambda n: n.startswith("output_heads.stress.")),
        "study_count": total(lambda n: "embedding" not in n),
    }


out = {
    "generator": "count_parameters.py",
    "versions": {
        "fairchem": "fairchem_core-1.9.0 (module files, github.com/FAIR-Chem/fairchem)",
        "torch": torch.__version__,
        "python": platform.python_version(),
    },
    "base": BASE,
    "models": {},
}
for name, config in CONFIGS.items():
    out["models"][name] = count(config)
    print(name, out["models"][name]["total"], out["models"][name]["study_count"])
(HERE / "parameter_counts.json").write_text(json.dumps(out, indent=1))
