//! File formats end to end: fixtures written by ASE, real DFT data sets, round trips through
//! matscale's writers, error reporting and robustness against malformed input.

use std::path::{Path, PathBuf};

use matscale_structures::io::{self, ReadError};
use matscale_structures::pymatgen::{self, StressOrder};
use matscale_structures::structure::Mat3;
use matscale_structures::{aselmdb, extxyz, InfoValue, PerAtomArray, PerAtomData, Structure};
use matscale_tests::data_file;
use serde_json::Value;

fn load_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Bool(b) => out.push(f64::from(u8::from(*b))),
            other => out.push(other.as_f64().unwrap()),
        }
    }
    walk(v, &mut out);
    out
}

fn flat(v: &[[f64; 3]]) -> Vec<f64> {
    v.iter().flatten().copied().collect()
}

fn flat_m(m: &Mat3) -> Vec<f64> {
    m.iter().flatten().copied().collect()
}

/// Compares a structure with what ASE returned for it (see tests/data/formats/make_fixtures.py).
/// Floats must be bit-identical: both sides parsed the same decimal strings.
fn assert_matches_ase(s: &Structure, e: &Value, what: &str) {
    let numbers: Vec<u8> = e["numbers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(s.numbers(), numbers.as_slice(), "{what}: numbers");
    assert_eq!(
        flat(s.positions()),
        f64s(&e["positions"]),
        "{what}: positions"
    );
    assert_eq!(flat_m(s.cell()), f64s(&e["cell"]), "{what}: cell");
    let pbc: Vec<bool> = e["pbc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    assert_eq!(s.pbc().to_vec(), pbc, "{what}: pbc");
    assert_eq!(
        s.energy(),
        e.get("energy").and_then(Value::as_f64),
        "{what}: energy"
    );
    match e.get("forces") {
        Some(f) => assert_eq!(flat(s.forces().unwrap()), f64s(f), "{what}: forces"),
        None => assert!(s.forces().is_none(), "{what}: unexpected forces"),
    }
    match e.get("stress_voigt") {
        Some(v) => assert_eq!(
            s.stress_voigt().unwrap().to_vec(),
            f64s(v),
            "{what}: stress"
        ),
        None => assert!(s.stress().is_none(), "{what}: unexpected stress"),
    }
}

fn info_as_json(v: &InfoValue) -> Value {
    serde_json::to_value(v).unwrap()
}

#[test]
fn extxyz_written_by_ase_reads_identically() {
    let frames = io::read_all(&data_file("formats/ase_written.extxyz")).unwrap();
    let expected = load_json(&data_file("formats/ase_written.json"));
    let expected = expected.as_array().unwrap();
    assert_eq!(frames.len(), expected.len());
    for (i, (s, e)) in frames.iter().zip(expected).enumerate() {
        let what = format!("frame {i}");
        assert_matches_ase(s, e, &what);
        // Every info key ASE kept is kept, with the same value and type.
        let info = e["info"].as_object().unwrap();
        assert_eq!(
            s.info().len(),
            info.len(),
            "{what}: info keys {:?}",
            s.info()
        );
        for (k, v) in info {
            assert_eq!(&info_as_json(&s.info()[k]), v, "{what}: info {k}");
        }
        // Every extra column ASE kept is kept.
        let arrays = e["arrays"].as_object().unwrap();
        assert_eq!(s.arrays().len(), arrays.len(), "{what}: arrays");
        for (k, v) in arrays {
            let a = &s.arrays()[k];
            let values: Vec<f64> = match &a.data {
                PerAtomData::Real(x) => x.clone(),
                PerAtomData::Int(x) => x.iter().map(|&i| i as f64).collect(),
                other => panic!("{what}: unexpected type of {k}: {other:?}"),
            };
            assert_eq!(values, f64s(v), "{what}: array {k}");
        }
    }
    // Spot checks of the typing rules.
    let s = &frames[0];
    assert_eq!(s.info()["step"], InfoValue::Int(7));
    assert_eq!(s.info()["converged"], InfoValue::Bool(true));
    assert_eq!(s.info()["kpts"], InfoValue::IntArray(vec![4, 4, 4]));
    assert_eq!(
        frames[1].info()["name"],
        InfoValue::Str("a \"quoted\" name".into())
    );
    assert_eq!(frames[1].pbc(), [true, true, false]);
    assert_eq!(frames[2].pbc(), [false; 3]);
}

fn check_lmdb_against_expected(path: &Path) {
    let frames = aselmdb::read_all(path).unwrap();
    let expected = load_json(&data_file("formats/aselmdb_expected.json"));
    let expected = expected.as_array().unwrap();
    assert_eq!(frames.len(), expected.len());
    for (i, (s, e)) in frames.iter().zip(expected).enumerate() {
        let what = format!("{} row {i}", path.display());
        assert_matches_ase(s, e, &what);
        for (k, v) in e["key_value_pairs"].as_object().unwrap() {
            assert_eq!(&info_as_json(&s.info()[k]), v, "{what}: key_value_pair {k}");
        }
        assert_eq!(s.info()["note"], InfoValue::Str("fixture".into()));
        // A 1-D array in `data` is info (only `[atoms, width]` arrays there are per-atom).
        assert_eq!(
            s.info()["site_energies"],
            InfoValue::FloatArray(f64s(&e["data"]["site_energies"])),
            "{what}"
        );
        // Per-atom ASE arrays of the row (tags, written by ASE's atoms2dict).
        if let Some(tags) = e["arrays"].get("tags") {
            let want: Vec<i64> = f64s(tags).iter().map(|&x| x as i64).collect();
            assert_eq!(s.arrays()["tags"].data, PerAtomData::Int(want), "{what}");
        }
    }
    let reader = aselmdb::read_path(path).unwrap();
    assert_eq!(reader.len(), 3);
    assert_eq!(reader.next_id().unwrap(), Some(4));
    assert_eq!(
        reader.metadata().unwrap().unwrap()["source"],
        Value::from("matscale fixture")
    );
}

#[test]
fn aselmdb_written_like_fairchem_reads_identically() {
    check_lmdb_against_expected(&data_file("formats/ase_style.aselmdb"));
    check_lmdb_against_expected(&data_file("formats/plain_lists.aselmdb"));
}

/// Random structures exercising every label, info type and column type.
fn random_structures(n: usize, seed: u64) -> Vec<Structure> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64) / ((1u64 << 53) as f64)
    };
    let mut out = Vec::new();
    for k in 0..n {
        let atoms = 1 + (next() * 6.0) as usize;
        let numbers: Vec<u8> = (0..atoms).map(|_| 1 + (next() * 90.0) as u8).collect();
        // Values of every magnitude, including ones that need exponents.
        let scale = [1.0, 1e-7, 1e3, 1e17][k % 4];
        let positions: Vec<[f64; 3]> = (0..atoms)
            .map(|_| [next() * 5.0, -next() * 5.0, next() * scale])
            .collect();
        let periodic = k % 3 != 2;
        let cell = if periodic {
            [
                [4.0 + next(), next() * 0.3, 0.0],
                [next() * 0.1, 4.5 + next(), next() * 0.2],
                [-next(), 0.0, 5.0 + next()],
            ]
        } else {
            [[0.0; 3]; 3]
        };
        let pbc = if periodic {
            [true, k % 2 == 0, true]
        } else {
            [false; 3]
        };
        let mut s = Structure::new(numbers, positions, cell, pbc).unwrap();
        s.set_energy(-next() * 100.0 - 1e-9).unwrap();
        s.set_forces(
            (0..atoms)
                .map(|_| [next() - 0.5, 0.0, -next() * scale])
                .collect(),
        )
        .unwrap();
        if periodic {
            let mut st = [[0.0; 3]; 3];
            for i in 0..3 {
                for j in i..3 {
                    st[i][j] = (next() - 0.5) * 1e-2;
                    st[j][i] = st[i][j];
                }
            }
            s.set_stress(st).unwrap();
        }
        let info = s.info_mut();
        info.insert("flag".into(), InfoValue::Bool(k % 2 == 0));
        info.insert("step".into(), InfoValue::Int(k as i64 - 3));
        info.insert("temperature".into(), InfoValue::Float(300.0 + next()));
        info.insert("whole".into(), InfoValue::Float(2.0));
        info.insert(
            "label".into(),
            InfoValue::Str(format!("run {k} \"x\"=1 \\ end")),
        );
        info.insert("word".into(), InfoValue::Str("plain_word".into()));
        info.insert("mask".into(), InfoValue::BoolArray(vec![true, false, true]));
        info.insert("kpts".into(), InfoValue::IntArray(vec![4, 4, 2]));
        info.insert("one".into(), InfoValue::FloatArray(vec![next()]));
        info.insert(
            "vec".into(),
            InfoValue::FloatArray(vec![next(), -1e-12, 1e20]),
        );
        info.insert(
            "names".into(),
            InfoValue::StrArray(vec!["a b".into(), "c".into()]),
        );
        s.set_array(
            "tags",
            PerAtomArray {
                width: 1,
                data: PerAtomData::Int((0..atoms as i64).collect()),
            },
        )
        .unwrap();
        s.set_array(
            "vel",
            PerAtomArray {
                width: 3,
                data: PerAtomData::Real((0..3 * atoms).map(|_| next() - 0.5).collect()),
            },
        )
        .unwrap();
        s.set_array(
            "fixed",
            PerAtomArray {
                width: 1,
                data: PerAtomData::Bool((0..atoms).map(|i| i % 2 == 0).collect()),
            },
        )
        .unwrap();
        s.set_array(
            "kind",
            PerAtomArray {
                width: 1,
                data: PerAtomData::Str((0..atoms).map(|i| format!("k{i}")).collect()),
            },
        )
        .unwrap();
        out.push(s);
    }
    out
}

#[test]
fn extxyz_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("round.extxyz");
    let frames = random_structures(40, 1);
    assert_eq!(io::write_all(&path, &frames).unwrap(), frames.len());
    // Only the final file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    let back = io::read_all(&path).unwrap();
    assert_eq!(back, frames);
    // Sequential and parallel parsing agree.
    let seq: Vec<Structure> = extxyz::read_path(&path)
        .unwrap()
        .parallel(false)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(seq, frames);
}

#[test]
fn aselmdb_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("round.aselmdb");
    let frames = random_structures(30, 2);
    assert_eq!(io::write_all(&path, &frames).unwrap(), frames.len());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("round.aselmdb")]);
    let back = io::read_all(&path).unwrap();
    assert_eq!(back.len(), frames.len());
    for (b, f) in back.iter().zip(&frames) {
        assert_eq!(b.numbers(), f.numbers());
        assert_eq!(b.positions(), f.positions());
        assert_eq!(b.cell(), f.cell());
        assert_eq!(b.pbc(), f.pbc());
        assert_eq!(b.energy(), f.energy());
        assert_eq!(b.forces(), f.forces());
        // Stored as Voigt 6: the (symmetric) stress comes back exactly.
        assert_eq!(b.stress(), f.stress());
        assert_eq!(b.info(), f.info());
        assert_eq!(b.arrays(), f.arrays());
    }
    let reader = aselmdb::read_path(&path).unwrap();
    assert_eq!(reader.next_id().unwrap(), Some(frames.len() as u64 + 1));
}

#[test]
fn conversion_between_formats_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let xyz = dir.path().join("a.xyz");
    let lmdb = dir.path().join("b.lmdb");
    let xyz2 = dir.path().join("c.extxyz");
    let frames = random_structures(9, 3);
    io::write_all(&xyz, &frames).unwrap();
    io::write_frames(&lmdb, io::read_frames(&xyz).unwrap()).unwrap();
    io::write_frames(&xyz2, io::read_frames(&lmdb).unwrap()).unwrap();
    assert_eq!(io::read_all(&xyz2).unwrap(), frames);
}

#[test]
fn unfinished_writers_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let frames = random_structures(2, 4);
    for name in ["x.extxyz", "x.aselmdb"] {
        let path = dir.path().join(name);
        if name.ends_with("extxyz") {
            let mut w = extxyz::Writer::create(&path).unwrap();
            w.write(&frames[0]).unwrap();
            drop(w);
        } else {
            let mut w = aselmdb::Writer::create(&path).unwrap();
            w.write(&frames[0]).unwrap();
            drop(w);
        }
        assert!(!path.exists(), "{name}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{name}");
    }
}

#[test]
fn writer_rejects_what_it_cannot_represent() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = random_structures(1, 5).remove(0);
    s.info_mut()
        .insert("bad key".into(), InfoValue::Str("x".into()));
    let path = dir.path().join("bad.xyz");
    let mut w = extxyz::Writer::create(&path).unwrap();
    let err = w.write(&s).unwrap_err();
    assert!(err.to_string().contains("bad key"), "{err}");
    let err = io::write_all(&dir.path().join("x.json"), &[]).unwrap_err();
    assert!(err.to_string().contains("cannot write"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Real data

fn real(name: &str) -> PathBuf {
    data_file(&format!("real/{name}"))
}

fn max_abs_force_sum(s: &Structure) -> f64 {
    let mut sum = [0.0f64; 3];
    for f in s.forces().unwrap() {
        for k in 0..3 {
            sum[k] += f[k];
        }
    }
    sum.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

fn mlearn_order(element: &str) -> StressOrder {
    // Found on the data (see docs/FORMATS.md): Si follows VASP's order, Mo/Cu/Ni LAMMPS's.
    if element == "Si" {
        StressOrder::Vasp
    } else {
        StressOrder::Lammps
    }
}

fn read_mlearn(element: &str, file: &str, order: StressOrder) -> Vec<Structure> {
    let path = real(&format!("mlearn/{element}/{file}"));
    pymatgen::read_path_with(
        &path,
        pymatgen::Options {
            mlearn_stress_order: order,
        },
    )
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Per element: files and the range of DFT (PBE, VASP) total energy per atom, eV. Ground
/// states: Si -5.42, Mo -10.85, Cu -4.10, Ni -5.78; strained, surface, vacancy and hot AIMD
/// frames lie above, by up to about 1.4 eV/atom in these sets.
const MLEARN: [(&str, &[&str], f64, f64); 4] = [
    ("Si", &["training.json", "test.json"], -5.45, -4.5),
    ("Mo", &["training.json", "test.json"], -10.9, -9.3),
    ("Cu", &["test.json"], -4.15, -3.5),
    ("Ni", &["test.json"], -5.8, -5.1),
];

#[test]
fn mlearn_files_load_with_sensible_labels() {
    let mut total = 0;
    for (element, files, lo, hi) in MLEARN {
        let z = matscale_structures::elements::atomic_number(element).unwrap();
        for file in files {
            let frames = read_mlearn(element, file, mlearn_order(element));
            assert!(frames.len() > 20, "{element}/{file}: {} rows", frames.len());
            let mut min_epa = f64::INFINITY;
            for (i, s) in frames.iter().enumerate() {
                let what = format!("{element}/{file} row {i}");
                assert!(s.numbers().iter().all(|&n| n == z), "{what}");
                assert_eq!(
                    s.info()["num_atoms"],
                    InfoValue::Int(s.len() as i64),
                    "{what}"
                );
                let epa = s.energy().unwrap() / s.len() as f64;
                assert!((lo..hi).contains(&epa), "{what}: {epa} eV/atom");
                min_epa = min_epa.min(epa);
                // Newton's third law: DFT forces sum to zero (to the file's 1e-8 rounding).
                assert!(max_abs_force_sum(s) < 1e-6, "{what}");
                // Stress in eV/Å^3: below 100 GPa.
                let st = s.stress().unwrap();
                assert!(
                    st.iter().flatten().all(|x| x.abs() < 100.0 / 160.2),
                    "{what}"
                );
            }
            // The set contains near-ground-state frames.
            assert!(min_epa < lo + 0.1, "{element}/{file}: lowest {min_epa}");
            total += frames.len();
        }
    }
    assert_eq!(total, 214 + 25 + 194 + 23 + 31 + 31);
}

/// The index of the single non-zero off-diagonal element of a cell (a cell sheared in one
/// plane), if it is one.
fn single_shear(cell: &Mat3) -> Option<(usize, usize)> {
    let mut found = None;
    for i in 0..3 {
        for j in 0..3 {
            if i != j && cell[i][j].abs() > 1e-3 {
                if found.is_some() {
                    return None;
                }
                found = Some((i, j));
            }
        }
    }
    found
}

/// On mlearn's `Elastic` rows (one applied strain each): the stress must respond to the strain
/// in component and sign. A cell sheared in the (i, j) plane has its largest shear stress in
/// σ_ij, of the strain's sign (ASE convention: tension positive); an axis compressed more than
/// the others has the most negative normal stress. Returns (rows checked, rows passing).
fn elastic_response(frames: &[Structure]) -> (usize, usize) {
    let (mut checked, mut passing) = (0, 0);
    for s in frames {
        if s.info().get("group") != Some(&InfoValue::Str("Elastic".into())) {
            continue;
        }
        let c = s.cell();
        let st = s.stress().unwrap();
        if let Some((i, j)) = single_shear(c) {
            checked += 1;
            let pairs = [(0, 1), (1, 2), (0, 2)];
            let largest = pairs
                .iter()
                .copied()
                .max_by(|a, b| st[a.0][a.1].abs().total_cmp(&st[b.0][b.1].abs()))
                .unwrap();
            let want = (i.min(j), i.max(j));
            let strain_sign = c[i][j].signum() * c[j][j].signum();
            if largest == want && st[i][j].signum() == strain_sign {
                passing += 1;
            }
        } else {
            let diag = [c[0][0], c[1][1], c[2][2]];
            let mean = (diag[0] + diag[1] + diag[2]) / 3.0;
            let Some(a) =
                (0..3).max_by(|&x, &y| (diag[x] - mean).abs().total_cmp(&(diag[y] - mean).abs()))
            else {
                continue;
            };
            if (diag[a] - mean).abs() < 1e-3 {
                continue; // unstrained
            }
            checked += 1;
            let compressed = diag[a] < mean;
            let most_negative = (0..3)
                .min_by(|&x, &y| st[x][x].total_cmp(&st[y][y]))
                .unwrap();
            let most_positive = (0..3)
                .max_by(|&x, &y| st[x][x].total_cmp(&st[y][y]))
                .unwrap();
            let ok = if compressed {
                most_negative == a && st[a][a] < 0.0
            } else {
                most_positive == a && st[a][a] > 0.0
            };
            if ok {
                passing += 1;
            }
        }
    }
    (checked, passing)
}

#[test]
fn mlearn_stress_order_and_sign_follow_the_applied_strain() {
    for (element, files, _, _) in MLEARN {
        let frames: Vec<Structure> = files
            .iter()
            .flat_map(|f| read_mlearn(element, f, mlearn_order(element)))
            .collect();
        let (checked, passing) = elastic_response(&frames);
        assert!(checked >= 10, "{element}: {checked} elastic rows");
        assert_eq!(passing, checked, "{element}");
    }
    // The other order fails on sheared rows: the two datasets really differ.
    for (element, wrong) in [("Si", StressOrder::Lammps), ("Mo", StressOrder::Vasp)] {
        let frames = read_mlearn(element, "training.json", wrong);
        let (checked, passing) = elastic_response(&frames);
        assert!(passing < checked, "{element}: {passing}/{checked}");
    }
}

#[test]
fn boron_extxyz_loads_with_sensible_labels() {
    let frames = io::read_all(&real("libatoms-workflow/B_DFT_data.xyz")).unwrap();
    assert_eq!(frames.len(), 39);
    let mut bulk = Vec::new();
    for (i, s) in frames.iter().enumerate() {
        assert!(s.numbers().iter().all(|&z| z == 5), "frame {i}");
        // REF_energy and REF_forces are the labels.
        let epa = s.energy().unwrap() / s.len() as f64;
        assert!(max_abs_force_sum(s) < 1e-4, "frame {i}");
        let kind = &s.info()["config_type"];
        match kind {
            InfoValue::Str(k) if k == "isolated_atom" => assert!(epa.abs() < 0.1, "{epa}"),
            InfoValue::Str(k) if k == "dimer" => assert!((-2.0..0.0).contains(&epa), "{epa}"),
            _ => {
                // Random (buildcell) crystals: above α-B's -6.7 eV/atom.
                assert!((-6.7..-2.5).contains(&epa), "frame {i}: {epa}");
                let v = s.volume() / s.len() as f64;
                assert!((5.0..11.0).contains(&v), "frame {i}: {v} Å^3/atom");
                bulk.push((epa, s.stress().unwrap()));
            }
        }
    }
    assert_eq!(bulk.len(), 30);
    // Sign: these unrelaxed random packings are pushed apart by short contacts, the more the
    // higher their energy: the high-energy half has the more negative stress (ASE sign).
    bulk.sort_by(|a, b| a.0.total_cmp(&b.0));
    let trace = |m: &Mat3| m[0][0] + m[1][1] + m[2][2];
    let low: f64 = bulk[..15].iter().map(|(_, m)| trace(m)).sum();
    let high: f64 = bulk[15..].iter().map(|(_, m)| trace(m)).sum();
    assert!(high < low && high < 0.0, "{low} {high}");
}

#[test]
fn hfo2_extxyz_loads_with_sensible_labels() {
    let frames = io::read_all(&real("sevennet/hfo2.extxyz")).unwrap();
    assert_eq!(frames.len(), 2);
    for s in &frames {
        assert_eq!(s.len(), 12);
        assert_eq!(s.numbers().iter().filter(|&&z| z == 72).count(), 4);
        assert!(max_abs_force_sum(s) < 1e-5);
        // `energy` and `free_energy` are equal in this file; `energy` is taken.
        assert_eq!(
            s.info()["free_energy"],
            InfoValue::Float(s.energy().unwrap())
        );
    }
    // The second frame is the first compressed by about 1.8 % in volume: higher energy and a
    // more negative (compressive, ASE sign) stress.
    let (a, b) = (&frames[0], &frames[1]);
    assert!(b.volume() < a.volume());
    assert!(b.energy().unwrap() > a.energy().unwrap());
    for k in 0..3 {
        assert!(b.stress().unwrap()[k][k] < a.stress().unwrap()[k][k]);
        assert!(a.stress().unwrap()[k][k] < 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and robustness

fn parse(text: &str) -> Result<Vec<Structure>, ReadError> {
    extxyz::parse_str(text, Path::new("bad.xyz"))
}

const GOOD: &str = "2\nLattice=\"4 0 0 0 4 0 0 0 4\" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.5\nCu 0 0 0 0.1 0 0\nCu 2 2 2 -0.1 0 0\n";

fn err_at(text: &str) -> (ReadError, usize, usize) {
    let e = parse(text).unwrap_err();
    let loc = e
        .location()
        .unwrap_or_else(|| panic!("no location: {e}"))
        .clone();
    assert_eq!(loc.path, Path::new("bad.xyz"));
    (e, loc.frame.unwrap(), loc.line.unwrap())
}

#[test]
fn extxyz_errors_name_file_frame_and_line() {
    let two = format!("{GOOD}{GOOD}");
    assert_eq!(parse(&two).unwrap().len(), 2);
    let cases: Vec<(String, usize, usize, &str)> = vec![
        // (text, frame, line, message fragment)
        (format!("{GOOD}3\n{}", &GOOD[2..]), 1, 9, "truncated"),
        (
            two.replace("Cu 2 2 2 -0.1 0 0\n2", "Cu 2 2 2 -0.1 0\n2"),
            0,
            4,
            "expected 7 columns",
        ),
        (
            two.replacen("Cu 0 0 0 0.1", "Cu 0 0 0 0.1 7", 1),
            0,
            3,
            "found 8",
        ),
        (
            two.replacen("2 2 2", "2 x 2", 1),
            0,
            4,
            "expected a real number",
        ),
        (two.replacen("0.1 0 0", "NaN 0 0", 1), 0, 3, "non-finite"),
        (two.replacen("Cu 2", "Qq 2", 1), 0, 4, "Qq"),
        (
            two.replacen("0 0 0 4 0 0 0 4", "0 0 0 4 0 0 0", 1),
            0,
            2,
            "Lattice",
        ),
        (
            two.replacen(
                "Lattice=\"4 0 0 0 4 0 0 0 4\"",
                "Lattice=\"0 0 0 0 0 0 0 0 0\"",
                1,
            ),
            0,
            2,
            "singular",
        ),
        (two.replacen("pos:R:3", "pos:R:2", 1), 0, 2, "pos"),
        (two.replacen(":pos:R:3", "", 1), 0, 2, "pos:R:3"),
        (
            two.replacen("energy=-1.5", "energy=\"-1.5", 1),
            0,
            2,
            "unterminated",
        ),
        (
            two.replacen("energy=-1.5", "energy=high", 1),
            0,
            2,
            "energy",
        ),
        (format!("{GOOD}two\n"), 1, 5, "number of atoms"),
    ];
    for (text, frame, line, fragment) in cases {
        let (e, f, l) = err_at(&text);
        let msg = e.to_string();
        assert_eq!((f, l), (frame, line), "{msg}");
        assert!(msg.contains(fragment), "{msg:?} lacks {fragment:?}");
        assert!(msg.contains("bad.xyz"), "{msg}");
    }
}

#[test]
fn missing_files_and_unknown_formats_are_errors() {
    let e = io::read_frames(Path::new("/nonexistent/x.xyz")).unwrap_err();
    assert!(matches!(e, ReadError::Io { .. }), "{e}");
    let e = io::read_frames(Path::new("x.cif")).unwrap_err();
    assert!(matches!(e, ReadError::UnknownFormat { .. }), "{e}");
    let e = io::read_frames(Path::new("/nonexistent/x.aselmdb")).unwrap_err();
    assert!(e.to_string().contains("x.aselmdb"), "{e}");
}

#[test]
fn corrupt_aselmdb_rows_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.aselmdb");
    let mut s = random_structures(1, 6).remove(0);
    s.clear_labels();
    let mut w = aselmdb::Writer::create(&path).unwrap();
    w.write(&s).unwrap();
    w.write(&s).unwrap();
    w.finish().unwrap();
    // Truncate the file: opening or reading must fail with a message, never panic.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let result = aselmdb::read_path(&path).and_then(|r| r.collect::<Result<Vec<_>, _>>());
    assert!(result.is_err());
}

mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = extxyz::read_from(bytes.as_slice(), Path::new("fuzz.xyz"));
            let text = String::from_utf8_lossy(&bytes);
            let _ = pymatgen::parse_str(&text, Path::new("fuzz.json"), Default::default());
        }

        #[test]
        fn mutated_valid_files_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = format!("{GOOD}{GOOD}").into_bytes();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            let _ = extxyz::read_from(bytes.as_slice(), Path::new("fuzz.xyz"));
            let cut = cut.index(bytes.len() + 1);
            let _ = extxyz::read_from(&bytes[..cut], Path::new("fuzz.xyz"));
        }

        #[test]
        fn mutated_json_never_panics(
            at in any::<prop::sample::Index>(),
            b in any::<u8>(),
        ) {
            let text = r#"[{"structure": {"lattice": {"matrix": [[2, 0, 0], [0, 2, 0], [0, 0, 2]]}, "sites": [{"species": [{"element": "Si", "occu": 1}], "xyz": [0, 0, 0]}]}, "outputs": {"energy": -5.0, "forces": [[0, 0, 0]], "virial_stress": [1, 2, 3, 4, 5, 6]}}]"#;
            let mut bytes = text.as_bytes().to_vec();
            let i = at.index(bytes.len());
            bytes[i] = b;
            let text = String::from_utf8_lossy(&bytes);
            let _ = pymatgen::parse_str(&text, Path::new("fuzz.json"), Default::default());
        }
    }
}
