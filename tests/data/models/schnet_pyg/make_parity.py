"""Numerical parity fixture: PyTorch Geometric's SchNet on small periodic structures.

Builds PyG's SchNet (hidden 16, filters 12, 2 interactions, 10 Gaussians, cutoff 4 Å) in
float64 with a fixed seed, gives every bias a random value (PyG initialises them to zero,
which would leave them untested), and evaluates the unmodified PyG forward pass on three small
periodic structures. The periodic edges come from ASE's neighbour list at the same cutoff and
reach PyG through its `interaction_graph` hook: edge_index = [j (source), i (target)], edge
length |pos[j] - pos[i] + S·cell|, the convention of matscale's batches. Forces are
-dE/dpositions and stress (1/V)·dE/dstrain (ASE sign) by autograd through a symmetric strain
applied to positions and cell.

Writes (run from this directory):
  parity_weights.safetensors  float64 weights under PyG's state_dict names, which are also
                              matscale's names (duplicates `conv.nn.*` and the Gaussian
                              centres buffer left out)
  parity.json                 the structures, energies (eV), forces (eV/Å), stress (eV/Å^3)
"""

import json
import struct

import numpy as np
import torch
import torch_geometric
import ase
from ase.build import bulk
from ase.neighborlist import neighbor_list
from torch_geometric.nn.models import SchNet
from torch_geometric.nn.models.schnet import ShiftedSoftplus

CUTOFF = 4.0
HYPER = dict(hidden_channels=16, num_filters=12, num_interactions=2, num_gaussians=10)


def structures():
    rng = np.random.default_rng(7)
    cu = bulk("Cu", "fcc", a=3.61)  # one atom: only periodic images as neighbours
    cu.positions += rng.normal(0, 0.05, (1, 3))
    nio = bulk("NiO", "rocksalt", a=4.17, cubic=False) * (2, 1, 1)
    nio.cell = nio.cell.array @ np.array([[1.0, 0.04, 0.0], [0.0, 1.0, 0.05], [0.03, 0.0, 1.0]])
    nio.positions += rng.normal(0, 0.1, nio.positions.shape)
    alo = ase.Atoms(
        "Al2O",
        scaled_positions=[[0.1, 0.2, 0.05], [0.55, 0.45, 0.6], [0.3, 0.8, 0.35]],
        cell=[[3.9, 0.0, 0.0], [0.6, 4.2, 0.0], [-0.4, 0.5, 4.4]],
        pbc=True,
    )
    return [cu, nio, alo]


class GivenEdges(torch.nn.Module):
    """PyG's interaction-graph hook returning the edges set by the caller."""

    def __init__(self):
        super().__init__()
        self.edges = None

    def forward(self, _pos, _batch):
        return self.edges


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().numpy().astype("<f8").tobytes()
        header[name] = {"dtype": "F64", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234)
    graph = GivenEdges()
    model = SchNet(cutoff=CUTOFF, interaction_graph=graph, **HYPER)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)

    # PyG's softplus returns x itself above 20: make sure the fixture never reaches that branch,
    # where it differs from the exact softplus by up to 2e-9.
    largest = [0.0]

    def record(_module, inputs, _output):
        largest[0] = max(largest[0], inputs[0].abs().max().item())

    for m in model.modules():
        if isinstance(m, ShiftedSoftplus):
            m.register_forward_hook(record)

    out = []
    for atoms in structures():
        i, j, S = neighbor_list("ijS", atoms, CUTOFF)
        pos0 = torch.tensor(atoms.positions, requires_grad=True)
        cell0 = torch.tensor(atoms.cell.array)
        eps = torch.zeros(3, 3, requires_grad=True)
        deform = torch.eye(3) + 0.5 * (eps + eps.T)
        pos, cell = pos0 @ deform, cell0 @ deform
        src, dst = torch.tensor(j), torch.tensor(i)
        vec = pos[src] - pos[dst] + torch.tensor(S, dtype=torch.float64) @ cell
        length = vec.norm(dim=-1)
        graph.edges = (torch.stack([src, dst]), length)
        z = torch.tensor(atoms.numbers)
        energy = model(z, pos).sum()
        g_pos, g_eps = torch.autograd.grad(energy, [pos0, eps])
        out.append(
            {
                "numbers": atoms.numbers.tolist(),
                "positions": atoms.positions.tolist(),
                "cell": atoms.cell.array.tolist(),
                "n_edges": len(i),
                "energy": energy.item(),
                "forces": (-g_pos).tolist(),
                "stress": (g_eps / atoms.get_volume()).tolist(),
            }
        )
    assert largest[0] < 20.0, largest[0]

    weights = {
        k: v
        for k, v in model.state_dict().items()
        if ".conv.nn." not in k and not k.startswith("distance_expansion")
    }
    write_safetensors("parity_weights.safetensors", weights)
    with open("parity.json", "w") as f:
        json.dump(
            {
                "tool": f"torch_geometric {torch_geometric.__version__}, torch {torch.__version__}, "
                f"ase {ase.__version__}",
                "cutoff": CUTOFF,
                **HYPER,
                "largest_softplus_input": largest[0],
                "structures": out,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
