"""Generate the EMT fixtures (emt_ase.json) with ASE's EMT calculator.

Run with:  python tests/data/emt/make_fixtures.py
Needs ase (3.29.0 was used) and numpy. Floats are written with repr (shortest round-trip),
so the Rust tests compare against ASE's exact float64 results.
"""

import json
import os

import ase
import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111, make_supercell
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron

rng = np.random.default_rng(20261125)
METALS = ["Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"]


def conventional(symbol, a, rep=(1, 1, 1)):
    return bulk(symbol, "fcc", a=a, cubic=True).repeat(rep)


def alloy(symbols, a, rep=(2, 2, 2), strain=0.0, rattle=0.0):
    atoms = conventional("Cu", a, rep)
    atoms.set_chemical_symbols(list(rng.choice(symbols, size=len(atoms))))
    if strain:
        eps = rng.uniform(-strain, strain, size=(3, 3))
        eps = 0.5 * (eps + eps.T)
        atoms.set_cell(atoms.cell @ (np.eye(3) + eps), scale_atoms=True)
    if rattle:
        atoms.positions += rng.normal(0.0, rattle, size=atoms.positions.shape)
    return atoms


cases = []


def add(name, atoms):
    cases.append((name, atoms))


add("Cu_primitive_a3.61", bulk("Cu", "fcc", a=3.61))
add("Pt_primitive_a3.92", bulk("Pt", "fcc", a=3.92))
for sym, a in [("Al", 4.05), ("Ag", 4.09), ("Au", 4.08), ("Ni", 3.52), ("Pd", 3.89)]:
    add(f"{sym}_conventional_rattled", alloy([sym], a, rep=(1, 1, 1), rattle=0.05))
add("Cu_compressed_2x2x2", alloy(["Cu"], 3.50, rattle=0.02))
add("Cu_expanded_2x2x2", alloy(["Cu"], 3.75, rattle=0.02))
add("CuAu_binary_strained_rattled", alloy(["Cu", "Au"], 3.85, strain=0.03, rattle=0.08))
add("NiPdPt_ternary_strained_rattled", alloy(["Ni", "Pd", "Pt"], 3.80, strain=0.03, rattle=0.1))
add("AlCuAgAu_quaternary", alloy(["Al", "Cu", "Ag", "Au"], 3.95, strain=0.02, rattle=0.07))
add("AgPdPtNi_quaternary_3x2x2", alloy(["Ag", "Pd", "Pt", "Ni"], 3.85, rep=(3, 2, 2), strain=0.03, rattle=0.1))
add("all_metals_4x4x4", alloy(METALS, 3.9, rep=(4, 4, 4), strain=0.01, rattle=0.05))

# Triclinic, strongly skewed cell: a non-reduced 4-atom supercell of the fcc primitive cell.
tri = make_supercell(bulk("Cu", "fcc", a=3.7), [[1, 0, 0], [2, 1, 0], [1, -1, 4]])
tri.set_chemical_symbols(list(rng.choice(["Cu", "Ni", "Pd"], size=len(tri))))
tri.positions += rng.normal(0.0, 0.08, tri.positions.shape)
add("triclinic_skewed_CuNiPd", tri)

# Tiny cells where the cutoff exceeds the cell size many times over.
two = Atoms("AuAg", positions=[[0, 0, 0], [1.3, 1.4, 1.2]],
            cell=[[2.9, 0.1, 0.0], [0.3, 2.8, 0.2], [0.1, 0.4, 2.7]], pbc=True)
add("two_atoms_tiny_triclinic_cell", two)

# Atoms outside the cell (unwrapped positions).
out = alloy(["Cu", "Pt"], 3.8, rep=(1, 1, 2), rattle=0.05)
out.positions[::2] += out.cell[0] * 1.0 - out.cell[2] * 2.0
out.positions[1] += out.cell[1] * 3.0
add("unwrapped_positions_CuPt", out)

# Light elements in a metal host.
hcno = alloy(["Cu", "Ni"], 3.7, rep=(2, 2, 2), rattle=0.03)
for sym, frac in [("H", (0.25, 0.25, 0.25)), ("C", (0.125, 0.125, 0.125)),
                  ("N", (0.25, 0.75, 0.25)), ("O", (0.75, 0.25, 0.75))]:
    hcno.append(ase.Atom(sym, np.array(frac) @ hcno.cell[:] + rng.normal(0, 0.05, 3)))
add("CuNi_with_HCNO_interstitials", hcno)

# Mixed periodicity: a Pt(111) slab, periodic in-plane only.
slab = fcc111("Pt", size=(2, 2, 3), a=3.92, vacuum=6.0)
slab.set_chemical_symbols(list(rng.choice(["Pt", "Au"], size=len(slab))))
slab.positions += rng.normal(0, 0.05, slab.positions.shape)
add("PtAu_slab_pbc_TTF", slab)

# Non-periodic cluster without a cell (no stress), and one in a box (ASE gives a stress).
ico = Icosahedron("Cu", noshells=2)
ico.set_chemical_symbols(list(rng.choice(["Cu", "Ag"], size=len(ico))))
ico.positions += rng.normal(0, 0.05, ico.positions.shape)
ico.set_cell(np.zeros((3, 3)))
ico.pbc = False
add("CuAg_icosahedron_no_cell", ico)
boxed = ico.copy()
boxed.set_cell([12.0, 13.0, 14.0])
add("CuAg_icosahedron_in_box_pbc_F", boxed)

# A small molecule of light elements plus an isolated atom far from everything.
mol = Atoms("COHN", positions=[[0, 0, 0], [1.15, 0.1, 0.0], [-0.9, 0.6, 0.2], [0.3, -1.2, 0.4]])
mol.append(ase.Atom("Al", (20.0, 0.0, 0.0)))
add("CONH_molecule_and_isolated_Al", mol)

rows = []
for name, atoms in cases:
    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    energies = atoms.get_potential_energies()
    stress = atoms.get_stress().tolist() if atoms.cell.rank == 3 else None
    rows.append({
        "name": name,
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell[:].tolist(),
        "pbc": atoms.pbc.tolist(),
        "energy": float(energy),
        "energies": energies.tolist(),
        "forces": forces.tolist(),
        "stress": stress,
    })

out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emt_ase.json")
with open(out_path, "w") as f:
    json.dump({"ase_version": ase.__version__, "numpy_version": np.__version__,
               "structures": rows}, f)
print(f"wrote {len(rows)} structures to {out_path}")
