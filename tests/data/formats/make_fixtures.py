"""Generate the format fixtures of tests/data/formats with ASE (and python-lmdb).

Run from the repository root:  python tests/data/formats/make_fixtures.py

Writes
- ase_written.extxyz     frames written by ase.io.write (extxyz): periodic, mixed-pbc and
                         molecular frames, calculator results, extra info keys and columns
- ase_written.json       what ase.io.read returns for each of those frames (exact floats)
- ase_style.aselmdb      an ASE LMDB the way fairchem's LMDBDatabase (1.x) writes it: rows
                         encoded with ASE's JSON encoder ({"__ndarray__": ...}), zlib, keys
                         "1", "2", ..., plus "nextid" and "metadata"
- plain_lists.aselmdb    the same rows with numpy arrays as plain nested lists (what newer
                         fairchem writes through orjson)
- aselmdb_expected.json  the structures in both LMDB files (exact floats)
"""

import json
import os
import zlib

import ase
import ase.io
import lmdb
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db.row import AtomsRow
from ase.io.jsonio import encode

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261125)


def frames():
    out = []
    # 1. Periodic fcc Cu supercell, rattled, triclinic strain, full calculator results.
    a = ase.Atoms(
        "Cu8",
        scaled_positions=rng.random((8, 3)),
        cell=[[3.6, 0.1, 0.0], [0.2, 3.7, 0.05], [0.0, -0.3, 3.8]],
        pbc=True,
    )
    stress = rng.normal(size=6) * 1e-2
    a.calc = SinglePointCalculator(
        a, energy=-29.123456789012345, forces=rng.normal(size=(8, 3)), stress=stress
    )
    a.info["config_type"] = "bulk rattled"
    a.info["step"] = 7
    a.info["temperature"] = 300.0
    a.info["converged"] = True
    a.info["kpts"] = np.array([4, 4, 4])
    a.info["dipole_guess"] = np.array([0.1, -0.2, 0.3])
    a.new_array("tags", np.arange(8, dtype=int))
    a.new_array("magmoms_extra", rng.normal(size=8))
    a.new_array("vel", rng.normal(size=(8, 3)))
    out.append(a)
    # 2. Mixed pbc slab with an alloy, no stress.
    b = ase.Atoms(
        "NiAlNiAl",
        positions=rng.random((4, 3)) * 4.0,
        cell=[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 20.0]],
        pbc=[True, True, False],
    )
    b.calc = SinglePointCalculator(b, energy=-17.5, forces=rng.normal(size=(4, 3)))
    b.info["name"] = 'a "quoted" name'
    out.append(b)
    # 3. A molecule: no cell, no pbc, energy only.
    c = ase.Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    c.calc = SinglePointCalculator(c, energy=-14.2)
    out.append(c)
    return out


def atoms_to_expected(atoms):
    d = {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": atoms.pbc.tolist(),
        "info": {},
        "arrays": {},
    }
    calc = atoms.calc
    if calc is not None:
        r = calc.results
        if "energy" in r:
            d["energy"] = float(r["energy"])
        if "forces" in r:
            d["forces"] = np.asarray(r["forces"]).tolist()
        if "stress" in r:
            d["stress_voigt"] = np.asarray(r["stress"]).tolist()
    for k, v in atoms.info.items():
        d["info"][k] = plain(v)
    for k, v in atoms.arrays.items():
        if k in ("numbers", "positions"):
            continue
        d["arrays"][k] = np.asarray(v).reshape(len(atoms), -1).tolist()
    return d


def write_extxyz():
    path = os.path.join(HERE, "ase_written.extxyz")
    ase.io.write(path, frames(), format="extxyz")
    back = ase.io.read(path, index=":")
    with open(os.path.join(HERE, "ase_written.json"), "w") as f:
        json.dump([atoms_to_expected(x) for x in back], f, indent=1)


def lmdb_rows():
    rows = []
    for i, atoms in enumerate(frames()):
        row = AtomsRow(atoms)
        row.ctime = 26.9
        row.user = "fixture"
        dct = {}
        for key in row.__dict__:
            if key[0] == "_" or key in row._keys or key == "id":
                continue
            dct[key] = row[key]
        dct["mtime"] = 26.9
        dct["unique_id"] = f"{i:032x}"
        dct["cell"] = np.asarray(dct["cell"])
        dct["key_value_pairs"] = {"config_type": f"frame{i}", "index": i, "weight": 0.5 + i}
        dct["data"] = {"note": "fixture", "site_energies": rng.normal(size=len(atoms))}
        rows.append((atoms, dct))
    return rows


def plain(obj):
    """What orjson with OPT_SERIALIZE_NUMPY produces: arrays as nested lists."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def write_lmdb(name, rows, encoder):
    path = os.path.join(HERE, name)
    for p in (path, path + "-lock"):
        if os.path.exists(p):
            os.remove(p)
    env = lmdb.open(path, map_size=1 << 24, subdir=False, meminit=False, lock=True)
    with env.begin(write=True) as txn:
        for i, (_, dct) in enumerate(rows):
            txn.put(f"{i + 1}".encode("ascii"), zlib.compress(encoder(dct).encode("ascii")))
        txn.put(b"nextid", zlib.compress(encoder(len(rows) + 1).encode("ascii")))
        txn.put(b"metadata", zlib.compress(encoder({"source": "matscale fixture"}).encode("ascii")))
    env.close()
    if os.path.exists(path + "-lock"):
        os.remove(path + "-lock")


def main():
    write_extxyz()
    rows = lmdb_rows()
    write_lmdb("ase_style.aselmdb", rows, encode)
    write_lmdb("plain_lists.aselmdb", rows, lambda d: json.dumps(plain(d)))
    expected = []
    for atoms, dct in rows:
        e = atoms_to_expected(atoms)
        e["key_value_pairs"] = dct["key_value_pairs"]
        e["data"] = plain(dct["data"])
        expected.append(e)
    with open(os.path.join(HERE, "aselmdb_expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print("ase", ase.__version__, "numpy", np.__version__, "lmdb", lmdb.__version__)


if __name__ == "__main__":
    main()
