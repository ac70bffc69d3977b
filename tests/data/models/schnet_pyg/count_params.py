"""Parameter counts of PyTorch Geometric's SchNet for several hyper-parameter sets.

Prints a JSON document (committed as param_counts.json) that matscale's SchNet tests compare
their analytic and built parameter counts against. Run from this directory:

    python count_params.py > param_counts.json

Besides PyG's own model, each entry also counts the variant of the study matscale follows
(akshaytrikha/materials-scaling, omat24/models/schnet.py as of Feb 2025: PyG's SchNet layers
plus a per-atom stress output Linear(hidden, 6)), whose counts the study quotes.
"""

import json

import torch
import torch_geometric
from torch_geometric.nn.models import SchNet

# (hidden_channels, num_filters, num_interactions, num_gaussians)
CONFIGS = [
    (128, 128, 6, 50),  # PyG's default and the study's middle size
    (64, 64, 3, 50),  # the study's small size
    (256, 256, 8, 50),  # the study's large size
    (16, 12, 2, 10),  # the parity fixture's size
    (7, 5, 1, 3),  # odd hidden width (the readout halves it with floor division)
    (33, 17, 4, 25),
    (2, 1, 1, 2),  # the smallest valid model
]


def count(module):
    return sum(p.numel() for p in module.parameters())


def main():
    rows = []
    for hidden, filters, interactions, gaussians in CONFIGS:
        model = SchNet(
            hidden_channels=hidden,
            num_filters=filters,
            num_interactions=interactions,
            num_gaussians=gaussians,
            cutoff=5.0,
        )
        pyg = count(model)
        study = pyg + count(torch.nn.Linear(hidden, 6))
        rows.append(
            {
                "hidden_channels": hidden,
                "num_filters": filters,
                "num_interactions": interactions,
                "num_gaussians": gaussians,
                "pyg_parameters": pyg,
                "study_feb2025_parameters": study,
            }
        )
    print(
        json.dumps(
            {
                "tool": f"torch_geometric {torch_geometric.__version__}, torch {torch.__version__}",
                "configs": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
