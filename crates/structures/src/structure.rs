//! [`Structure`]: one atomic configuration with its optional DFT labels.

use std::collections::BTreeMap;

use crate::elements;

/// A 3x3 matrix stored row-major (`m[row][col]`).
pub type Mat3 = [[f64; 3]; 3];

/// Why a [`Structure`] (or a label attached to it) is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StructureError {
    /// Two per-atom arrays disagree in length.
    #[error(
        "length mismatch: `{field}` has {found} entries but the structure has {expected} atoms"
    )]
    LengthMismatch {
        /// The field whose length is wrong.
        field: String,
        /// The number of atoms.
        expected: usize,
        /// The length found.
        found: usize,
    },
    /// A NaN or infinity in a numeric field.
    #[error("non-finite value {value} in `{field}`{}", index.map(|i| format!(" at index {i}")).unwrap_or_default())]
    NonFinite {
        /// The field holding the value.
        field: String,
        /// The atom (or component) index, if the field is an array.
        index: Option<usize>,
        /// The offending value.
        value: f64,
    },
    /// An atomic number outside 1..=118.
    #[error("unknown atomic number {0} (expected 1..=118)")]
    UnknownAtomicNumber(u32),
    /// A chemical symbol that is not an element.
    #[error("unknown element symbol {0:?}")]
    UnknownElement(String),
    /// The cell has (near-)zero volume while some axis is periodic.
    #[error("singular cell (volume {volume:.3e} Å^3) with periodic boundary conditions {pbc:?}")]
    SingularCell {
        /// The cell volume, Å^3.
        volume: f64,
        /// The periodic axes.
        pbc: [bool; 3],
    },
    /// The stress (or virial) needs a cell volume but the cell has none.
    #[error("`{0}` needs a non-singular cell, but the cell volume is zero")]
    NeedsVolume(String),
}

/// A free-form value in [`Structure::info`] (per-structure metadata from extxyz comment lines,
/// ASE database key-value pairs, pymatgen dicts, ...).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum InfoValue {
    /// A boolean (`T`/`F` in extxyz).
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A real number.
    Float(f64),
    /// A string.
    Str(String),
    /// An array of booleans.
    BoolArray(Vec<bool>),
    /// An array of integers.
    IntArray(Vec<i64>),
    /// An array of real numbers.
    FloatArray(Vec<f64>),
    /// An array of strings.
    StrArray(Vec<String>),
}

/// Per-atom values that are not one of the standard labels (extxyz `Properties` columns such as
/// `magmoms:R:1` or `tags:I:1`). `width` values per atom, row-major `[atom][component]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PerAtomArray {
    /// Number of values per atom (the column count in extxyz `Properties`).
    pub width: usize,
    /// The values, `n_atoms * width` of them.
    pub data: PerAtomData,
}

/// The typed storage of a [`PerAtomArray`] (the extxyz S/I/R/L column types).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PerAtomData {
    /// `S` columns.
    Str(Vec<String>),
    /// `I` columns.
    Int(Vec<i64>),
    /// `R` columns.
    Real(Vec<f64>),
    /// `L` columns.
    Bool(Vec<bool>),
}

impl PerAtomData {
    /// Number of stored values (atoms × width).
    pub fn len(&self) -> usize {
        match self {
            Self::Str(v) => v.len(),
            Self::Int(v) => v.len(),
            Self::Real(v) => v.len(),
            Self::Bool(v) => v.len(),
        }
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One atomic configuration: atoms in a (possibly periodic) cell, with optional DFT labels.
///
/// Units and conventions follow ASE: positions in Å, `cell` rows are the lattice vectors (Å),
/// energy in eV (total, not per atom), forces in eV/Å, stress in eV/Å^3 with
/// σ = (1/V) ∂E/∂ε, so a compressed cell has **negative** stress.
///
/// The fields are private so that every `Structure` is valid: finite numbers, known elements,
/// per-atom arrays of the right length and a non-singular cell whenever some axis is periodic.
#[derive(Debug, Clone, PartialEq)]
pub struct Structure {
    numbers: Vec<u8>,
    positions: Vec<[f64; 3]>,
    cell: Mat3,
    pbc: [bool; 3],
    energy: Option<f64>,
    forces: Option<Vec<[f64; 3]>>,
    stress: Option<Mat3>,
    info: BTreeMap<String, InfoValue>,
    arrays: BTreeMap<String, PerAtomArray>,
}

/// Volumes below this (Å^3) count as singular.
const MIN_VOLUME: f64 = 1e-10;

fn check_finite(field: &str, values: impl IntoIterator<Item = f64>) -> Result<(), StructureError> {
    for (i, v) in values.into_iter().enumerate() {
        if !v.is_finite() {
            return Err(StructureError::NonFinite {
                field: field.to_string(),
                index: Some(i),
                value: v,
            });
        }
    }
    Ok(())
}

fn check_len(field: &str, expected: usize, found: usize) -> Result<(), StructureError> {
    if expected != found {
        return Err(StructureError::LengthMismatch {
            field: field.to_string(),
            expected,
            found,
        });
    }
    Ok(())
}

impl Structure {
    /// Builds a structure from atomic numbers, Cartesian positions (Å), cell (rows are lattice
    /// vectors, Å) and periodicity per axis, checking everything.
    pub fn new(
        numbers: Vec<u8>,
        positions: Vec<[f64; 3]>,
        cell: Mat3,
        pbc: [bool; 3],
    ) -> Result<Self, StructureError> {
        check_len("positions", numbers.len(), positions.len())?;
        for &z in &numbers {
            if elements::symbol(z).is_none() {
                return Err(StructureError::UnknownAtomicNumber(z as u32));
            }
        }
        check_finite("positions", positions.iter().flatten().copied())?;
        check_finite("cell", cell.iter().flatten().copied())?;
        let s = Self {
            numbers,
            positions,
            cell,
            pbc,
            energy: None,
            forces: None,
            stress: None,
            info: BTreeMap::new(),
            arrays: BTreeMap::new(),
        };
        if pbc.iter().any(|&p| p) && s.volume() < MIN_VOLUME {
            return Err(StructureError::SingularCell {
                volume: s.volume(),
                pbc,
            });
        }
        Ok(s)
    }

    /// Like [`Structure::new`] but with chemical symbols (`"Cu"`, `"O"`, ...).
    pub fn from_symbols<S: AsRef<str>>(
        symbols: &[S],
        positions: Vec<[f64; 3]>,
        cell: Mat3,
        pbc: [bool; 3],
    ) -> Result<Self, StructureError> {
        let numbers = symbols
            .iter()
            .map(|s| {
                elements::atomic_number(s.as_ref())
                    .ok_or_else(|| StructureError::UnknownElement(s.as_ref().to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(numbers, positions, cell, pbc)
    }

    /// Number of atoms.
    pub fn len(&self) -> usize {
        self.numbers.len()
    }

    /// Whether the structure has no atoms.
    pub fn is_empty(&self) -> bool {
        self.numbers.is_empty()
    }

    /// Atomic numbers.
    pub fn numbers(&self) -> &[u8] {
        &self.numbers
    }

    /// Chemical symbols, one per atom.
    pub fn symbols(&self) -> Vec<&'static str> {
        self.numbers
            .iter()
            .map(|&z| elements::symbol(z).expect("atomic numbers are validated on construction"))
            .collect()
    }

    /// Cartesian positions, Å.
    pub fn positions(&self) -> &[[f64; 3]] {
        &self.positions
    }

    /// The cell, rows are lattice vectors (Å).
    pub fn cell(&self) -> &Mat3 {
        &self.cell
    }

    /// Periodic boundary conditions per axis.
    pub fn pbc(&self) -> [bool; 3] {
        self.pbc
    }

    /// Cell volume |det(cell)|, Å^3.
    pub fn volume(&self) -> f64 {
        det3(&self.cell).abs()
    }

    /// Total energy, eV.
    pub fn energy(&self) -> Option<f64> {
        self.energy
    }

    /// Forces, eV/Å.
    pub fn forces(&self) -> Option<&[[f64; 3]]> {
        self.forces.as_deref()
    }

    /// Stress as a 3x3 matrix, eV/Å^3, ASE sign (compressed cell: negative).
    pub fn stress(&self) -> Option<&Mat3> {
        self.stress.as_ref()
    }

    /// Stress in Voigt order (xx, yy, zz, yz, xz, xy), eV/Å^3, ASE sign.
    pub fn stress_voigt(&self) -> Option<[f64; 6]> {
        self.stress.as_ref().map(matrix_to_voigt)
    }

    /// Free-form per-structure metadata.
    pub fn info(&self) -> &BTreeMap<String, InfoValue> {
        &self.info
    }

    /// Mutable free-form metadata.
    pub fn info_mut(&mut self) -> &mut BTreeMap<String, InfoValue> {
        &mut self.info
    }

    /// Extra per-atom arrays (beyond species, positions and forces).
    pub fn arrays(&self) -> &BTreeMap<String, PerAtomArray> {
        &self.arrays
    }

    /// Attaches an extra per-atom array, checking its length.
    pub fn set_array(&mut self, name: &str, array: PerAtomArray) -> Result<(), StructureError> {
        check_len(name, self.len() * array.width, array.data.len())?;
        if let PerAtomData::Real(v) = &array.data {
            check_finite(name, v.iter().copied())?;
        }
        self.arrays.insert(name.to_string(), array);
        Ok(())
    }

    /// Replaces the positions (Å), e.g. after a rattle or a relaxation step.
    pub fn set_positions(&mut self, positions: Vec<[f64; 3]>) -> Result<(), StructureError> {
        check_len("positions", self.len(), positions.len())?;
        check_finite("positions", positions.iter().flatten().copied())?;
        self.positions = positions;
        Ok(())
    }

    /// Replaces the cell without moving the atoms (Cartesian positions stay as they are).
    pub fn set_cell(&mut self, cell: Mat3) -> Result<(), StructureError> {
        check_finite("cell", cell.iter().flatten().copied())?;
        if self.pbc.iter().any(|&p| p) && det3(&cell).abs() < MIN_VOLUME {
            return Err(StructureError::SingularCell {
                volume: det3(&cell).abs(),
                pbc: self.pbc,
            });
        }
        self.cell = cell;
        Ok(())
    }

    /// Sets the total energy, eV.
    pub fn set_energy(&mut self, energy: f64) -> Result<(), StructureError> {
        if !energy.is_finite() {
            return Err(StructureError::NonFinite {
                field: "energy".into(),
                index: None,
                value: energy,
            });
        }
        self.energy = Some(energy);
        Ok(())
    }

    /// Sets the forces, eV/Å.
    pub fn set_forces(&mut self, forces: Vec<[f64; 3]>) -> Result<(), StructureError> {
        check_len("forces", self.len(), forces.len())?;
        check_finite("forces", forces.iter().flatten().copied())?;
        self.forces = Some(forces);
        Ok(())
    }

    /// Sets the stress (3x3, eV/Å^3, ASE sign).
    pub fn set_stress(&mut self, stress: Mat3) -> Result<(), StructureError> {
        check_finite("stress", stress.iter().flatten().copied())?;
        self.stress = Some(stress);
        Ok(())
    }

    /// Sets the stress from the virial W (eV): σ = −W / V.
    pub fn set_stress_from_virial(&mut self, virial: Mat3) -> Result<(), StructureError> {
        let v = self.volume();
        if v < MIN_VOLUME {
            return Err(StructureError::NeedsVolume("virial".into()));
        }
        let mut s = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                s[i][j] = -virial[i][j] / v;
            }
        }
        self.set_stress(s)
    }

    /// Removes energy, forces and stress (e.g. before re-labelling).
    pub fn clear_labels(&mut self) {
        self.energy = None;
        self.forces = None;
        self.stress = None;
    }

    /// Fractional coordinates r·cell⁻¹ (requires a non-singular cell).
    pub fn scaled_positions(&self) -> Result<Vec<[f64; 3]>, StructureError> {
        let inv = inverse3(&self.cell)
            .ok_or_else(|| StructureError::NeedsVolume("scaled positions".into()))?;
        Ok(self.positions.iter().map(|r| vec_mat(r, &inv)).collect())
    }
}

/// A rotation matrix (proper, det +1) drawn uniformly from SO(3) with `rng` (Shoemake's
/// uniform unit quaternion). Rotating a structure means `r → R r` for positions, lattice
/// vectors and forces, and `σ → R σ Rᵀ` for stress.
pub fn random_rotation<R: rand::Rng + ?Sized>(rng: &mut R) -> Mat3 {
    let (u1, u2, u3): (f64, f64, f64) = (rng.gen(), rng.gen(), rng.gen());
    let tau = std::f64::consts::TAU;
    let (a, b, c, d) = (
        (1.0 - u1).sqrt() * (tau * u2).sin(),
        (1.0 - u1).sqrt() * (tau * u2).cos(),
        u1.sqrt() * (tau * u3).sin(),
        u1.sqrt() * (tau * u3).cos(),
    );
    [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a - b * b + c * c - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a - b * b - c * c + d * d,
        ],
    ]
}

/// Determinant of a 3x3 matrix.
pub fn det3(m: &Mat3) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Inverse of a 3x3 matrix, `None` if singular.
pub fn inverse3(m: &Mat3) -> Option<Mat3> {
    let d = det3(m);
    if d.abs() < MIN_VOLUME {
        return None;
    }
    let mut inv = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            // cofactor of (j, i) over the determinant
            let (a, b) = ((j + 1) % 3, (j + 2) % 3);
            let (c, e) = ((i + 1) % 3, (i + 2) % 3);
            inv[i][j] = (m[a][c] * m[b][e] - m[a][e] * m[b][c]) / d;
        }
    }
    Some(inv)
}

/// Row vector times matrix: `v · m`.
pub fn vec_mat(v: &[f64; 3], m: &Mat3) -> [f64; 3] {
    [
        v[0] * m[0][0] + v[1] * m[1][0] + v[2] * m[2][0],
        v[0] * m[0][1] + v[1] * m[1][1] + v[2] * m[2][1],
        v[0] * m[0][2] + v[1] * m[1][2] + v[2] * m[2][2],
    ]
}

/// 3x3 symmetric matrix to Voigt order (xx, yy, zz, yz, xz, xy).
pub fn matrix_to_voigt(m: &Mat3) -> [f64; 6] {
    [m[0][0], m[1][1], m[2][2], m[1][2], m[0][2], m[0][1]]
}

/// Voigt order (xx, yy, zz, yz, xz, xy) to a symmetric 3x3 matrix.
pub fn voigt_to_matrix(v: &[f64; 6]) -> Mat3 {
    [[v[0], v[5], v[4]], [v[5], v[1], v[3]], [v[4], v[3], v[2]]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(a: f64) -> Mat3 {
        [[a, 0.0, 0.0], [0.0, a, 0.0], [0.0, 0.0, a]]
    }

    #[test]
    fn validation_errors() {
        let err = Structure::new(vec![29], vec![], cube(3.0), [true; 3]).unwrap_err();
        assert!(
            matches!(err, StructureError::LengthMismatch { .. }),
            "{err}"
        );
        let err =
            Structure::new(vec![29], vec![[f64::NAN, 0.0, 0.0]], cube(3.0), [true; 3]).unwrap_err();
        assert!(err.to_string().contains("positions"), "{err}");
        let err = Structure::new(vec![0], vec![[0.0; 3]], cube(3.0), [true; 3]).unwrap_err();
        assert_eq!(err, StructureError::UnknownAtomicNumber(0));
        let err = Structure::new(
            vec![29],
            vec![[0.0; 3]],
            [[0.0; 3]; 3],
            [true, false, false],
        )
        .unwrap_err();
        assert!(matches!(err, StructureError::SingularCell { .. }));
        // A molecule in no cell is fine.
        Structure::new(
            vec![1, 1],
            vec![[0.0; 3], [0.74, 0.0, 0.0]],
            [[0.0; 3]; 3],
            [false; 3],
        )
        .unwrap();
        let err = Structure::from_symbols(&["Cu", "Qq"], vec![[0.0; 3]; 2], cube(3.0), [true; 3])
            .unwrap_err();
        assert_eq!(err, StructureError::UnknownElement("Qq".into()));
        let mut s = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cube(3.0), [true; 3]).unwrap();
        assert!(s.set_forces(vec![[0.0; 3]; 2]).is_err());
        assert!(s.set_energy(f64::INFINITY).is_err());
    }

    #[test]
    fn voigt_and_virial() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(matrix_to_voigt(&voigt_to_matrix(&v)), v);
        let mut s = Structure::from_symbols(&["Cu"], vec![[0.0; 3]], cube(2.0), [true; 3]).unwrap();
        s.set_stress_from_virial(cube(8.0)).unwrap();
        assert_eq!(s.stress_voigt().unwrap(), [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn inverse_and_scaled_positions() {
        let cell = [[3.0, 0.1, 0.2], [0.5, 4.0, 0.3], [0.7, 0.9, 5.0]];
        let inv = inverse3(&cell).unwrap();
        for i in 0..3 {
            let row = vec_mat(&cell[i], &inv);
            for j in 0..3 {
                assert!((row[j] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-14);
            }
        }
        let s = Structure::from_symbols(
            &["Cu"],
            vec![vec_mat(&[0.25, 0.5, 0.75], &cell)],
            cell,
            [true; 3],
        )
        .unwrap();
        let f = s.scaled_positions().unwrap()[0];
        assert!(
            (f[0] - 0.25).abs() < 1e-14
                && (f[1] - 0.5).abs() < 1e-14
                && (f[2] - 0.75).abs() < 1e-14
        );
    }
}
