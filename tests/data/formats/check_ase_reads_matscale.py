"""Check that ASE reads extxyz files written by matscale bit for bit.

matscale writes the same structures twice: as extxyz (the file under test) and as an ASE LMDB
(whose JSON rows carry every float exactly). This script reads the extxyz with ase.io.read and
the LMDB rows with zlib + json, and requires identical arrays.

    cargo xtask data convert SOURCE -o /tmp/a.extxyz
    cargo xtask data convert /tmp/a.extxyz -o /tmp/a.aselmdb
    python tests/data/formats/check_ase_reads_matscale.py /tmp/a.extxyz /tmp/a.aselmdb
"""

import json
import sys
import zlib

import ase.io
import lmdb
import numpy as np


def nd(v):
    if isinstance(v, dict) and "__ndarray__" in v:
        shape, dtype, flat = v["__ndarray__"]
        return np.array(flat, dtype=dtype).reshape(shape)
    return np.array(v)


def rows(path):
    env = lmdb.open(path, subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        ids = sorted(int(k) for k, _ in txn.cursor() if k.isdigit())
        for i in ids:
            yield json.loads(zlib.decompress(txn.get(str(i).encode())))


def same(a, b, what):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or not np.array_equal(a, b):
        raise SystemExit(f"MISMATCH {what}: max diff {np.max(np.abs(a - b)) if a.shape == b.shape else 'shape'}")


def main(xyz, db):
    frames = ase.io.read(xyz, index=":")
    n = 0
    for i, (atoms, row) in enumerate(zip(frames, rows(db), strict=True)):
        w = f"frame {i}"
        same(atoms.numbers, nd(row["numbers"]), w + " numbers")
        same(atoms.positions, nd(row["positions"]), w + " positions")
        same(atoms.cell.array, nd(row["cell"]), w + " cell")
        same(atoms.pbc, nd(row["pbc"]), w + " pbc")
        res = atoms.calc.results if atoms.calc is not None else {}
        for key in ("energy", "forces", "stress"):
            if key in row:
                same(res[key], nd(row[key]), f"{w} {key}")
            elif key in res:
                raise SystemExit(f"{w}: ASE found {key} that matscale did not write")
        n += 1
    print(f"OK: {n} frames of {xyz} read by ASE {ase.__version__} are bit-identical")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
