"""Training and inference throughput of the PyTorch references, the other half of
`throughput.rs` (same data, batches, hyper-parameters and output format).

* SchNet: PyTorch Geometric's `torch_geometric.nn.models.SchNet` (hidden 128, filters 128,
  6 interactions, 50 Gaussians, cutoff 5 A; 455,809 parameters). Its `forward` builds a
  non-periodic radius graph, so the submodules (`embedding`, `distance_expansion`,
  `interactions`, `lin1`/`act`/`lin2`) are driven on the periodic edges of ASE's
  `neighbor_list('ijS', atoms, 5.0)`, computed once per structure; edge vectors
  `r_j - r_i + S cell` are rebuilt from the positions in every step, so autograd forces are
  the periodic ones. Conservative mode: F = -dE/dr with `create_graph=True` for training.
  Direct mode: matscale's edge head written with PyTorch modules,
  `[w_F, w_s] = C_ij Linear(H, 2)(ssp(A h_i + A h_j + Linear(G, H)(e_ij)))`,
  `F_i = sum_{e -> i} w_F r_e/|r_e|`, stress `(1/V) sum_e w_s r_e r_e^T/|r_e|^2`.
* Transformer: the study's ADiT encoder exactly as matscale implements it (the layout of
  `tests/data/transformer/make_forward_fixture.py`): d 96, 1 head, 3 layers, ff 384, GELU
  tanh, pre-norm `nn.TransformerEncoder` with a key padding mask, final LayerNorm, atom-type,
  Cartesian and fractional-coordinate embedders, sinusoidal atom-index embedding, MLP heads
  (energy sum, direct forces, mean-pooled stress); dropout 0.

Data: tests/data/real/mlearn/Si/training.json (214 structures), structure k of the order is
(97 k) mod 214, batches of 8; every batch is turned into tensors before timing. A training
step: forward, loss 2.5 * energy-per-atom MAE + 20 * force L2-MAE, backward, gradient
clipping at global norm 1, AdamW (lr 1e-3, weight decay 1e-3); f32. Inference: energies and
forces (conservative: autograd without a graph of the gradient; direct: under
`torch.inference_mode`). Single process, `torch.set_num_threads(THREADS)` (default 2).

Usage: python throughput_torch.py [--structures 48] [--reps 3] [--warmup 2]
       [--cases schnet-conservative,schnet-direct,transformer-direct] [--threads 2]
Prints one JSON line per (case, phase).
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers
from ase.neighborlist import neighbor_list
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "..", "tests", "data", "real", "mlearn", "Si", "training.json")
BATCH, CUTOFF, LR, WEIGHT_DECAY = 8, 5.0, 1e-3, 1e-3
W_ENERGY, W_FORCES = 2.5, 20.0


def read_mlearn(path):
    """(numbers, positions, cell, energy, forces) per structure of an mlearn JSON file."""
    out = []
    for doc in json.load(open(path)):
        s = doc["structure"]
        numbers = np.array([atomic_numbers[site["species"][0]["element"]] for site in s["sites"]])
        positions = np.array([site["xyz"] for site in s["sites"]], dtype=float)
        cell = np.array(s["lattice"]["matrix"], dtype=float)
        out.append((numbers, positions, cell, doc["outputs"]["energy"],
                    np.array(doc["outputs"]["forces"], dtype=float)))
    return out


class Batch:
    """A batch as tensors: atoms, periodic edges (source j, target i, shift vectors S cell)."""

    def __init__(self, structures):
        numbers, pos, cells, energy, forces, node_structure = [], [], [], [], [], []
        src, dst, shift, edge_structure, offset = [], [], [], [], 0
        for b, (z, r, cell, e, f) in enumerate(structures):
            i, j, s = neighbor_list("ijS", Atoms(numbers=z, positions=r, cell=cell, pbc=True),
                                    CUTOFF)
            src.append(j + offset)
            dst.append(i + offset)
            shift.append(s @ cell)
            edge_structure.append(np.full(len(i), b))
            numbers.append(z)
            pos.append(r)
            cells.append(cell)
            energy.append(e)
            forces.append(f)
            node_structure.append(np.full(len(z), b))
            offset += len(z)
        t = lambda a, dt=torch.float32: torch.tensor(np.concatenate(a), dtype=dt)
        self.numbers = t(numbers, torch.long)
        self.positions = t(pos)
        self.cells = torch.tensor(np.stack(cells), dtype=torch.float32)
        self.src, self.dst = t(src, torch.long), t(dst, torch.long)
        self.shift = t(shift)
        self.edge_structure = t(edge_structure, torch.long)
        self.node_structure = t(node_structure, torch.long)
        self.n_atoms = torch.tensor([len(s[0]) for s in structures], dtype=torch.float32)
        self.energy = torch.tensor(energy, dtype=torch.float32)
        self.forces = t(forces)
        self.volumes = torch.linalg.det(self.cells).abs()
        self.sizes = [len(s[0]) for s in structures]
        self.n_structures = len(structures)


def ssp(x):
    return nn.functional.softplus(x) - math.log(2.0)


class PygSchNet(nn.Module):
    """PyG's SchNet on periodic edges, plus matscale's direct edge head in direct mode."""

    def __init__(self, direct, energy_scale, reference, force_scale):
        super().__init__()
        from torch_geometric.nn.models import SchNet

        self.net = SchNet(hidden_channels=128, num_filters=128, num_interactions=6,
                          num_gaussians=50, cutoff=CUTOFF)
        self.direct = direct
        if direct:
            h, g = 128, 50
            self.node = nn.Linear(h, h, bias=False)
            self.radial = nn.Linear(g, h)
            self.out = nn.Linear(h, 2)
        self.energy_scale, self.reference, self.force_scale = energy_scale, reference, force_scale

    def forward(self, b, positions):
        net = self.net
        vec = positions[b.src] - positions[b.dst] + b.shift
        dist = vec.norm(dim=-1)
        rbf = net.distance_expansion(dist)
        h = net.embedding(b.numbers)
        edge_index = torch.stack([b.src, b.dst])
        for block in net.interactions:
            h = h + block(h, edge_index, dist, rbf)
        per_atom = net.lin2(net.act(net.lin1(h)))
        raw = torch.zeros(b.n_structures).index_add_(0, b.node_structure, per_atom[:, 0])
        energy = raw * self.energy_scale + b.n_atoms * self.reference
        if not self.direct:
            return energy, None
        a = self.node(h)
        cutoff = 0.5 * (torch.cos(dist * math.pi / CUTOFF) + 1.0)
        w = self.out(ssp(a[b.src] + a[b.dst] + self.radial(rbf))) * cutoff[:, None]
        unit = vec / dist[:, None]
        forces = torch.zeros_like(positions).index_add_(0, b.dst, unit * w[:, :1])
        outer = unit[:, :, None] * unit[:, None, :] * w[:, 1, None, None]
        stress = torch.zeros(b.n_structures, 3, 3).index_add_(0, b.edge_structure, outer)
        stress = stress / b.volumes[:, None, None]
        return energy, forces * self.force_scale


class Adit(nn.Module):
    """The study's ADiT encoder (matscale `adit-d96-l3`), direct heads."""

    def __init__(self, energy_scale, reference, force_scale, d=96, heads=1, depth=3, hidden=128,
                 elements=100):
        super().__init__()

        def mlp(out):
            return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

        def embedder():
            return nn.Sequential(nn.Linear(3, d, bias=False), nn.SiLU(), nn.Linear(d, d))

        self.d = d
        self.atom_embedding = nn.Embedding(elements, d)
        self.pos_embedder, self.frac_embedder = embedder(), embedder()
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0,
                                       activation=nn.GELU(approximate="tanh"),
                                       batch_first=True, norm_first=True, bias=True),
            num_layers=depth, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.energy_head, self.force_head, self.stress_head = mlp(1), mlp(3), mlp(6)
        self.energy_scale, self.reference, self.force_scale = energy_scale, reference, force_scale

    def index_embedding(self, n, max_len=2048):
        t = torch.arange(n, dtype=torch.float32)[:, None]
        k = torch.arange(self.d // 2, dtype=torch.float32)[None]
        angle = t * math.pi / (max_len ** (2 * k / self.d))
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    def forward(self, b, positions):
        inv = torch.linalg.inv(b.cells)[b.node_structure]
        frac = torch.remainder(torch.bmm(positions[:, None, :], inv)[:, 0], 1.0)
        x = (self.atom_embedding(b.numbers) + self.pos_embedder(positions)
             + self.frac_embedder(frac))
        width = max(b.sizes)
        padded = torch.zeros(b.n_structures, width, self.d)
        mask = torch.ones(b.n_structures, width, dtype=torch.bool)
        start = 0
        for k, n in enumerate(b.sizes):
            padded[k, :n] = x[start:start + n] + self.index_embedding(n)
            mask[k, :n] = False
            start += n
        out = self.encoder(padded, src_key_padding_mask=mask)
        h = out[~mask]  # atoms in batch order
        per_atom = self.energy_head(h)[:, 0]
        raw = torch.zeros(b.n_structures).index_add_(0, b.node_structure, per_atom)
        energy = raw * self.energy_scale + b.n_atoms * self.reference
        forces = self.force_head(h) * self.force_scale
        voigt = torch.zeros(b.n_structures, 6).index_add_(0, b.node_structure,
                                                          self.stress_head(h))
        _stress = voigt / b.n_atoms[:, None]  # computed as matscale does, not in the loss
        return energy, forces


def predict(model, b, conservative, create_graph):
    if conservative:
        positions = b.positions.clone().requires_grad_(True)
        energy, _ = model(b, positions)
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
        return energy, -grad
    return model(b, b.positions)


def loss_fn(energy, forces, b):
    e = (energy / b.n_atoms - b.energy / b.n_atoms).abs().mean()
    f = (forces - b.forces).norm(dim=-1).mean()
    return W_ENERGY * e + W_FORCES * f


def normalizer(structures, conservative):
    """matscale's normaliser for one element: reference = mean energy per atom; energy scale =
    force RMS (conservative) or the spread of the per-atom energy (direct)."""
    per_atom = np.array([s[3] / len(s[0]) for s in structures])
    force_rms = float(np.sqrt(np.mean(np.concatenate([s[4].ravel() for s in structures]) ** 2)))
    energy_scale = force_rms if conservative else float(per_atom.std())
    return energy_scale, float(per_atom.mean()), force_rms


def summary(seconds, structures):
    rates = sorted(structures / s for s in seconds)
    return rates[-1], float(np.median(rates))


def run_case(case, structures, args):
    n = len(structures)
    order = [(97 * k) % n for k in range(n)]
    n_batches = min(math.ceil(args.structures / BATCH), math.ceil(n / BATCH))
    batches = [Batch([structures[i] for i in order[k * BATCH:(k + 1) * BATCH]])
               for k in range(n_batches)]
    conservative = case == "schnet-conservative"
    torch.manual_seed(1024)
    scales = normalizer(structures, conservative)
    if case.startswith("schnet"):
        model, impl = PygSchNet(not conservative, *scales), "pyg"
    else:
        model, impl = Adit(*scales), "pytorch"
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    info = {"structures": sum(b.n_structures for b in batches),
            "atoms": sum(len(b.numbers) for b in batches),
            "edges": sum(len(b.src) for b in batches)}

    def step(b):
        optimizer.zero_grad(set_to_none=True)
        energy, forces = predict(model, b, conservative, create_graph=True)
        loss = loss_fn(energy, forces, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    def infer(b):
        if conservative:
            energy, forces = predict(model, b, True, create_graph=False)
        else:
            with torch.inference_mode():
                energy, forces = predict(model, b, False, create_graph=False)
        return energy.sum().item(), forces.shape

    def report(phase, seconds, **extra):
        best, median = summary(seconds, info["structures"])
        line = {"impl": impl, "case": case, "phase": phase, "parameters": n_params, **info,
                "batch": BATCH, "threads": torch.get_num_threads(),
                "seconds": [round(s, 4) for s in seconds],
                "best_structures_per_s": round(best, 3),
                "median_structures_per_s": round(median, 3), **extra}
        print(json.dumps(line), flush=True)

    model.train()
    loss_first = None
    for k in range(args.warmup):
        loss = step(batches[k % len(batches)])
        loss_first = loss if loss_first is None else loss_first
    seconds = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for b in batches:
            loss = step(b)
        seconds.append(time.perf_counter() - t)
    report("train", seconds, loss_first=round(loss_first or float("nan"), 4),
           loss_last=round(loss, 4))

    model.eval()
    for k in range(args.warmup):
        infer(batches[k % len(batches)])
    seconds = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for b in batches:
            infer(b)
        seconds.append(time.perf_counter() - t)
    report("infer", seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--structures", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="schnet-conservative,schnet-direct,transformer-direct")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    structures = read_mlearn(DATA)
    for case in args.cases.split(","):
        run_case(case, structures, args)


if __name__ == "__main__":
    main()
