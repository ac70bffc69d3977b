"""Generate the neighbour-list fixtures in this directory with ASE.

Run from the repository root:

    /path/to/python tests/data/neighbors/make_fixtures.py

Writes `ase_cases.json`: a list of cases, each with the structure (cell rows are lattice vectors,
Å; pbc; atomic numbers; Cartesian positions, Å), the cutoff (Å) and the arrays ASE returns from
`ase.neighborlist.neighbor_list('ijdDS', atoms, cutoff)` sorted by (i, j, S). Floats are written
with Python's shortest round-trip repr, so they are exact.
"""

import json
import os

import ase
import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list

rng = np.random.default_rng(20261125)
cases = []


def add(name, atoms, cutoff):
    i, j, d, D, S = neighbor_list("ijdDS", atoms, cutoff)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))
    cases.append(
        {
            "name": name,
            "cell": atoms.cell.array.tolist(),
            "pbc": [bool(p) for p in atoms.pbc],
            "numbers": atoms.numbers.tolist(),
            "positions": atoms.positions.tolist(),
            "cutoff": cutoff,
            "i": i[order].tolist(),
            "j": j[order].tolist(),
            "S": S[order].tolist(),
            "d": d[order].tolist(),
            "D": D[order].tolist(),
        }
    )
    print(f"{name:28s} atoms={len(atoms):3d} cutoff={cutoff:5.2f} pairs={len(i)}")


def from_fractional(symbols, cell, frac, pbc):
    cell = np.asarray(cell, dtype=float)
    return Atoms(symbols, positions=np.asarray(frac) @ cell, cell=cell, pbc=pbc)


# Ground truth counts quoted in REFERENCE.md: 78 and 80 pairs.
add("fcc_cu_primitive_6A", bulk("Cu", "fcc", a=3.61), 6.0)
add("simple_cubic_2A_5A", Atoms("Cu", positions=[[0.3, 0.2, 0.1]], cell=np.eye(3) * 2.0, pbc=True), 5.0)

# General triclinic cell.
tri = Atoms(
    "CuAuNiPt",
    cell=ase.geometry.cellpar_to_cell([4.1, 5.3, 4.7, 71.0, 82.0, 109.0]),
    pbc=True,
)
tri.set_scaled_positions(rng.random((4, 3)))
add("triclinic_4atoms", tri, 4.5)

# Strongly skewed cell: lattice vectors nearly parallel, small face distances.
skew = [[4.0, 0.0, 0.0], [3.7, 1.2, 0.0], [-3.5, 2.0, 1.5]]
add("strongly_skewed", from_fractional("AlCuNi", skew, rng.random((3, 3)), True), 3.5)

# Tiny cells: far smaller than the cutoff in every (or one) direction.
tiny = ase.geometry.cellpar_to_cell([2.2, 2.5, 2.9, 75.0, 100.0, 65.0])
add("tiny_triclinic_1atom_6A", from_fractional("Ag", tiny, [[0.1, 0.7, 0.4]], True), 6.0)
thin = [[1.9, 0.0, 0.0], [0.4, 9.0, 0.0], [0.3, -0.6, 8.5]]
add("thin_cell_2atoms", from_fractional("CuO", thin, [[0.2, 0.1, 0.3], [0.6, 0.55, 0.8]], True), 5.0)

# Mixed periodicity.
slab = from_fractional("Pt" * 6, [[5.5, 0.0, 0.0], [0.0, 5.5, 0.0], [1.0, 0.5, 6.0]],
                       rng.random((6, 3)) * [1.0, 1.6, 1.0] - [0.0, 0.3, 0.0], [True, False, True])
add("slab_pbc_TFT", slab, 4.0)
wire = from_fractional("Ni" * 5, [[7.0, 0.0, 0.0], [0.0, 7.0, 0.0], [0.0, 0.0, 2.4]],
                       rng.random((5, 3)), [False, False, True])
add("wire_pbc_FFT", wire, 5.0)
molecule = Atoms("C2H6O", positions=rng.random((9, 3)) * 4.0, pbc=False)
add("molecule_no_cell", molecule, 2.5)
boxed = Atoms("C2H6O", positions=rng.random((9, 3)) * 6.0 - 1.0, cell=[[3.0, 0.5, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 3.0]],
              pbc=False)
add("molecule_in_cell_outside", boxed, 3.0)

# Unwrapped positions: fractional coordinates far outside [0, 1).
unwrapped = from_fractional(
    "CuAgAuPd",
    ase.geometry.cellpar_to_cell([3.9, 4.4, 5.0, 80.0, 95.0, 118.0]),
    [[-1.3, 2.7, 0.2], [2.7, -1.3, -0.6], [0.5, 0.5, 3.1], [-2.2, 0.1, -1.05]],
    True,
)
add("unwrapped_triclinic", unwrapped, 4.0)
unwrapped_mixed = from_fractional(
    "CuAgAu",
    [[4.0, 0.0, 0.0], [1.5, 4.2, 0.0], [0.0, 0.7, 4.4]],
    [[-1.3, 2.7, 0.2], [2.7, -1.3, 1.6], [0.4, 0.1, -0.7]],
    [True, False, True],
)
add("unwrapped_pbc_TFT", unwrapped_mixed, 5.0)

# A random 40-atom fcc alloy in a rattled, strained cell.
alloy = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 5, 1))
alloy.numbers = rng.choice([13, 28, 29, 46, 47, 78, 79], size=len(alloy))
strain = np.eye(3) + rng.normal(scale=0.05, size=(3, 3))
alloy.set_cell(alloy.cell.array @ strain, scale_atoms=True)
alloy.positions += rng.normal(scale=0.15, size=alloy.positions.shape)
add("alloy_40atoms_rattled", alloy, 3.6)

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ase_cases.json")
with open(out, "w") as f:
    json.dump({"generator": f"ase {ase.__version__}, numpy {np.__version__}", "cases": cases}, f,
              separators=(",", ":"))
print(f"wrote {out} ({os.path.getsize(out)} bytes)")
