//! ASE LMDB databases (`.aselmdb`, the format of OMat24 and fairchem's `LMDBDatabase`).
//!
//! The file is a single-file LMDB environment (no sub-directory). Each row is stored under its
//! id as ASCII decimal (`b"1"`, `b"2"`, ...) and holds a zlib-compressed JSON dict of an ASE
//! database row:
//!
//! - `numbers` (n), `positions` (n×3, Å), optional `cell` (3×3, rows are lattice vectors; also
//!   accepted as ASE's `{"array": ..., "__ase_objtype__": "cell"}`), optional `pbc` (3 bools);
//! - calculator results `energy` (eV), `free_energy`, `forces` (n×3, eV/Å), `stress` (Voigt 6
//!   xx, yy, zz, yz, xz, xy, or 3×3; eV/Å^3, ASE sign), and other ASE properties;
//! - `key_value_pairs` (scalars) and `data` (anything), plus bookkeeping (`ctime`, `mtime`,
//!   `user`, `unique_id`, `calculator`, ...).
//!
//! Arrays are either ASE's `{"__ndarray__": [shape, dtype, flat_values]}` (ASE's JSON encoder,
//! older fairchem) or plain nested lists (orjson with numpy support, newer fairchem); both are
//! read. The keys `nextid` (next free id), `metadata` and `deleted_ids` hold zlib-compressed JSON
//! too and are not rows. Rows are read in increasing id order.
//!
//! Mapping to [`Structure`]: `key_value_pairs` and scalar ASE results (`free_energy`, `magmom`,
//! ...) go to [`Structure::info`]; `initial_magmoms`, `initial_charges`, `tags`, `masses`,
//! `momenta`, per-atom ASE results (`magmoms`, `charges`, ...) and entries of `data` whose first
//! dimension is the number of atoms go to [`Structure::arrays`]; other numeric or string `data`
//! entries to info. The writer does the reverse, encoding arrays as `__ndarray__`.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, WithoutTls};
use serde_json::{json, Map, Value};

use crate::io::{temp_path, Location, ReadError, WriteError};
use crate::structure::{matrix_to_voigt, voigt_to_matrix, Mat3};
use crate::{InfoValue, PerAtomArray, PerAtomData, Structure};

/// Keys of an ASE LMDB that are not rows.
pub const RESERVED_KEYS: [&str; 3] = ["nextid", "metadata", "deleted_ids"];

/// ASE calculator properties (besides energy, forces and stress) kept at the top level of a row.
const ASE_PROPERTIES: [&str; 11] = [
    "free_energy",
    "stresses",
    "dipole",
    "charges",
    "magmom",
    "magmoms",
    "energies",
    "dielectric_tensor",
    "born_effective_charges",
    "polarization",
    "initial_magmoms",
];

/// Per-atom arrays ASE's `Atoms` knows by name, kept at the top level of a row.
const ASE_ATOM_ARRAYS: [&str; 4] = ["initial_charges", "tags", "masses", "momenta"];

/// Bookkeeping keys of a row that carry no physics.
const BOOKKEEPING: [&str; 9] = [
    "ctime",
    "mtime",
    "user",
    "unique_id",
    "calculator",
    "calculator_parameters",
    "constraints",
    "id",
    "natoms",
];

/// Opens an ASE LMDB file read-only and streams its rows in id order.
pub fn read_path(path: &Path) -> Result<Reader, ReadError> {
    Reader::open(path)
}

/// Reads every row of an ASE LMDB file.
pub fn read_all(path: &Path) -> Result<Vec<Structure>, ReadError> {
    read_path(path)?.collect()
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> ReadError {
    ReadError::parse(Location::file(path), format!("LMDB error: {e}"))
}

/// A streaming reader over the rows of an ASE LMDB file (read-only, no lock file, one read
/// transaction for the whole iteration).
pub struct Reader {
    path: PathBuf,
    txn: RoTxn<'static, WithoutTls>,
    db: Database<Bytes, Bytes>,
    ids: Vec<u64>,
    next: usize,
    done: bool,
}

impl Reader {
    /// Opens `path` (a single-file LMDB environment) read-only and lists its row ids.
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        if !path.is_file() {
            return Err(ReadError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        check_file(path).map_err(|m| ReadError::parse(Location::file(path), m))?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.max_dbs(1);
        // SAFETY: NO_LOCK is what fairchem uses for these files (`lock=False`): we only read,
        // and the contract (the same as fairchem's) is that nobody writes the file while it is
        // being read. NO_SUB_DIR and READ_ONLY are safe flags.
        unsafe {
            options.flags(EnvFlags::NO_SUB_DIR | EnvFlags::READ_ONLY | EnvFlags::NO_LOCK);
        }
        // SAFETY: the memory map is only read, and the file is not modified while it is open
        // (see above).
        let env: Env<WithoutTls> = unsafe { options.open(path) }.map_err(|e| db_err(path, e))?;
        let db: Database<Bytes, Bytes> = {
            let txn = env.read_txn().map_err(|e| db_err(path, e))?;
            let db = env.open_database(&txn, None).map_err(|e| db_err(path, e))?;
            txn.commit().map_err(|e| db_err(path, e))?;
            db.ok_or_else(|| db_err(path, "the file holds no main database"))?
        };
        let txn = env.static_read_txn().map_err(|e| db_err(path, e))?;
        let mut ids = Vec::new();
        for item in db.iter(&txn).map_err(|e| db_err(path, e))? {
            let (key, _) = item.map_err(|e| db_err(path, e))?;
            match std::str::from_utf8(key)
                .ok()
                .and_then(|k| k.parse::<u64>().ok())
            {
                Some(id) => ids.push(id),
                None => {
                    let name = String::from_utf8_lossy(key);
                    if !RESERVED_KEYS.contains(&name.as_ref()) {
                        return Err(ReadError::parse(
                            Location::file(path).with_key(name.to_string()),
                            "key is neither a row id nor one of nextid/metadata/deleted_ids",
                        ));
                    }
                }
            }
        }
        ids.sort_unstable();
        Ok(Self {
            path: path.to_path_buf(),
            txn,
            db,
            ids,
            next: 0,
            done: false,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the database has no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The row ids, in reading order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// The decoded `metadata` entry, if any.
    pub fn metadata(&self) -> Result<Option<Value>, ReadError> {
        self.reserved("metadata")
    }

    /// The decoded `nextid` entry, if any.
    pub fn next_id(&self) -> Result<Option<u64>, ReadError> {
        Ok(self.reserved("nextid")?.and_then(|v| v.as_u64()))
    }

    fn reserved(&self, key: &str) -> Result<Option<Value>, ReadError> {
        let loc = || Location::file(&self.path).with_key(key);
        let Some(raw) = self
            .db
            .get(&self.txn, key.as_bytes())
            .map_err(|e| db_err(&self.path, e))?
        else {
            return Ok(None);
        };
        let json = inflate(raw).map_err(|m| ReadError::parse(loc(), m))?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| ReadError::parse(loc(), format!("invalid JSON: {e}")))
    }

    fn read_row(&self, index: usize) -> Result<Structure, ReadError> {
        let id = self.ids[index];
        let key = id.to_string();
        let loc = || {
            Location::file(&self.path)
                .with_frame(index)
                .with_key(key.clone())
        };
        let raw = self
            .db
            .get(&self.txn, key.as_bytes())
            .map_err(|e| db_err(&self.path, e))?
            .ok_or_else(|| ReadError::parse(loc(), "row disappeared"))?;
        let json = inflate(raw).map_err(|m| ReadError::parse(loc(), m))?;
        let row: Value = serde_json::from_slice(&json)
            .map_err(|e| ReadError::parse(loc(), format!("invalid JSON: {e}")))?;
        row_to_structure(&row).map_err(|e| match e {
            RowError::Parse(field, m) => ReadError::parse(loc(), format!("`{field}`: {m}")),
            RowError::Structure(e) => ReadError::structure(loc(), e),
        })
    }
}

impl Iterator for Reader {
    type Item = Result<Structure, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next >= self.ids.len() {
            return None;
        }
        let item = self.read_row(self.next);
        self.next += 1;
        if item.is_err() {
            self.done = true;
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.done {
            0
        } else {
            self.ids.len() - self.next
        };
        (left, Some(left))
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("aselmdb::Reader")
            .field("path", &self.path)
            .field("rows", &self.ids.len())
            .field("next", &self.next)
            .finish()
    }
}

/// Checks the LMDB meta pages before the file is memory-mapped: a file shorter than its last
/// used page would make LMDB touch unmapped memory (SIGBUS) instead of returning an error.
fn check_file(path: &Path) -> Result<(), String> {
    const MAGIC: u32 = 0xBEEF_C0DE;
    let mut head = Vec::new();
    let len = std::fs::File::open(path)
        .and_then(|f| {
            let len = f.metadata()?.len();
            f.take(2 * 65536).read_to_end(&mut head)?;
            Ok(len)
        })
        .map_err(|e| format!("cannot read: {e}"))?;
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(head.get(off..off + 4)?.try_into().ok()?))
    };
    let u64_at = |off: usize| -> Option<u64> {
        Some(u64::from_le_bytes(head.get(off..off + 8)?.try_into().ok()?))
    };
    // 64-bit layout: 16-byte page header, then MDB_meta: magic, version, address, mapsize,
    // two 48-byte MDB_db records (the first one's pad holds the page size), last page, txn id.
    let not_lmdb = || "not an LMDB file (bad meta page)".to_string();
    if u32_at(16) != Some(MAGIC) {
        return Err(not_lmdb());
    }
    let page = u64::from(u32_at(40).ok_or_else(not_lmdb)?);
    if !(512..=65536).contains(&page) || !page.is_power_of_two() {
        return Err(not_lmdb());
    }
    let meta = |base: usize| -> Option<(u64, u64)> {
        if u32_at(base + 16)? != MAGIC {
            return None;
        }
        Some((u64_at(base + 144)?, u64_at(base + 136)?))
    };
    let (_, last_page) = [meta(0), meta(page as usize)]
        .into_iter()
        .flatten()
        .max()
        .ok_or_else(not_lmdb)?;
    let needed = last_page
        .checked_add(1)
        .and_then(|p| p.checked_mul(page))
        .ok_or_else(not_lmdb)?;
    if len < needed {
        return Err(format!(
            "truncated LMDB file: {len} bytes, but its last page ends at byte {needed}"
        ));
    }
    Ok(())
}

/// Largest decompressed row accepted, bytes (a guard against zlib bombs in corrupt files).
const MAX_ROW_BYTES: u64 = 1 << 30;

fn inflate(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len() * 4);
    ZlibDecoder::new(raw)
        .take(MAX_ROW_BYTES)
        .read_to_end(&mut out)
        .map_err(|e| format!("invalid zlib data: {e}"))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Decoding rows

enum RowError {
    Parse(String, String),
    Structure(crate::StructureError),
}

impl From<crate::StructureError> for RowError {
    fn from(e: crate::StructureError) -> Self {
        Self::Structure(e)
    }
}

fn bad(field: &str, message: impl Into<String>) -> RowError {
    RowError::Parse(field.to_string(), message.into())
}

/// A decoded numeric array: shape and values (ints and bools converted to `f64` too).
#[derive(Debug, Clone, PartialEq)]
struct NdArray {
    shape: Vec<usize>,
    values: Vec<Scalar>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn as_f64(self) -> f64 {
        match self {
            Self::Int(i) => i as f64,
            Self::Float(x) => x,
            Self::Bool(b) => f64::from(u8::from(b)),
        }
    }

    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Bool(b) => Some(Self::Bool(*b)),
            Value::Number(n) => n
                .as_i64()
                .map(Self::Int)
                .or_else(|| n.as_f64().map(Self::Float)),
            _ => None,
        }
    }
}

/// Decodes `{"__ndarray__": [shape, dtype, flat]}`, a (nested) list, or a scalar (shape `[]`).
fn ndarray(v: &Value) -> Option<NdArray> {
    if let Some(nd) = v.get("__ndarray__") {
        let parts = nd.as_array()?;
        let [shape, dtype, flat] = parts.as_slice() else {
            return None;
        };
        let shape: Vec<usize> = shape
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()?;
        let dtype = dtype.as_str()?;
        let flat = flat.as_array()?;
        if shape.iter().product::<usize>() != flat.len() {
            return None;
        }
        let mut values: Vec<Scalar> = flat.iter().map(Scalar::from_json).collect::<Option<_>>()?;
        if dtype.starts_with("float") {
            for x in &mut values {
                *x = Scalar::Float(x.as_f64());
            }
        }
        return Some(NdArray { shape, values });
    }
    // ASE Cell objects: {"array": ..., "__ase_objtype__": "cell"}.
    if let Some(array) = v.get("array") {
        return ndarray(array);
    }
    let mut shape = Vec::new();
    let mut values = Vec::new();
    nested(v, 0, &mut shape, &mut values)?;
    Some(NdArray { shape, values })
}

fn nested(v: &Value, depth: usize, shape: &mut Vec<usize>, out: &mut Vec<Scalar>) -> Option<()> {
    match v {
        Value::Array(items) => {
            if shape.len() == depth {
                shape.push(items.len());
            } else if shape.get(depth) != Some(&items.len()) {
                return None; // ragged
            }
            for item in items {
                nested(item, depth + 1, shape, out)?;
            }
            if items.is_empty() && shape.len() > depth + 1 {
                return None;
            }
            Some(())
        }
        other => {
            if shape.len() != depth {
                return None;
            }
            out.push(Scalar::from_json(other)?);
            Some(())
        }
    }
}

fn field<'a>(row: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    row.get(key).filter(|v| !v.is_null())
}

fn reals(v: &Value, key: &str, shape: &[usize]) -> Result<Vec<f64>, RowError> {
    let nd = ndarray(v).ok_or_else(|| bad(key, "expected a numeric array"))?;
    if nd.shape != shape {
        return Err(bad(
            key,
            format!("expected shape {shape:?}, found {:?}", nd.shape),
        ));
    }
    Ok(nd.values.iter().map(|x| x.as_f64()).collect())
}

fn triples(v: Vec<f64>) -> Vec<[f64; 3]> {
    v.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect()
}

fn row_to_structure(row: &Value) -> Result<Structure, RowError> {
    let row = row
        .as_object()
        .ok_or_else(|| bad("", "a row must be a JSON dict"))?;
    let numbers = field(row, "numbers")
        .and_then(ndarray)
        .ok_or_else(|| bad("numbers", "missing or not an integer array"))?;
    if numbers.shape.len() != 1 {
        return Err(bad(
            "numbers",
            format!("expected 1-D, found {:?}", numbers.shape),
        ));
    }
    let n = numbers.shape[0];
    let numbers: Vec<u8> = numbers
        .values
        .iter()
        .map(|z| match z {
            Scalar::Int(z) => u8::try_from(*z).ok(),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad("numbers", "atomic numbers must be integers in 0..=255"))?;
    let positions = triples(reals(
        field(row, "positions").ok_or_else(|| bad("positions", "missing"))?,
        "positions",
        &[n, 3],
    )?);
    let cell: Mat3 = match field(row, "cell") {
        Some(c) => {
            let v = reals(c, "cell", &[3, 3])?;
            [[v[0], v[1], v[2]], [v[3], v[4], v[5]], [v[6], v[7], v[8]]]
        }
        None => [[0.0; 3]; 3],
    };
    let pbc = match field(row, "pbc") {
        Some(p) => {
            let nd = ndarray(p).ok_or_else(|| bad("pbc", "expected 3 booleans"))?;
            match nd.values.as_slice() {
                [a, b, c] => [a.as_f64() != 0.0, b.as_f64() != 0.0, c.as_f64() != 0.0],
                [a] => [a.as_f64() != 0.0; 3],
                _ => return Err(bad("pbc", "expected 3 booleans")),
            }
        }
        None => [false; 3],
    };
    let mut s = Structure::new(numbers, positions, cell, pbc)?;
    let energy_key = ["energy", "free_energy"]
        .into_iter()
        .find(|k| field(row, k).is_some());
    if let Some(key) = energy_key {
        let e = field(row, key)
            .and_then(Value::as_f64)
            .ok_or_else(|| bad(key, "expected a number"))?;
        s.set_energy(e)?;
    }
    if let Some(f) = field(row, "forces") {
        s.set_forces(triples(reals(f, "forces", &[n, 3])?))?;
    }
    if let Some(st) = field(row, "stress") {
        let nd = ndarray(st).ok_or_else(|| bad("stress", "expected a numeric array"))?;
        let v: Vec<f64> = nd.values.iter().map(|x| x.as_f64()).collect();
        let m = match nd.shape.as_slice() {
            [6] => voigt_to_matrix(&[v[0], v[1], v[2], v[3], v[4], v[5]]),
            [3, 3] => [[v[0], v[1], v[2]], [v[3], v[4], v[5]], [v[6], v[7], v[8]]],
            other => {
                return Err(bad(
                    "stress",
                    format!("expected 6 or 3x3 values, found shape {other:?}"),
                ))
            }
        };
        s.set_stress(m)?;
    }
    for (key, value) in row {
        let k = key.as_str();
        if matches!(
            k,
            "numbers"
                | "positions"
                | "cell"
                | "pbc"
                | "forces"
                | "stress"
                | "key_value_pairs"
                | "data"
        ) || Some(k) == energy_key
            || BOOKKEEPING.contains(&k)
            || value.is_null()
        {
            continue;
        }
        add_value(&mut s, k, value, true)?;
    }
    if let Some(Value::Object(kvp)) = field(row, "key_value_pairs") {
        for (k, v) in kvp {
            add_value(&mut s, k, v, false)?;
        }
    }
    if let Some(Value::Object(data)) = field(row, "data") {
        for (k, v) in data {
            add_value(&mut s, k, v, false)?;
        }
    }
    Ok(s)
}

/// Adds a value to info, or to the per-atom arrays: at the top level of a row (ASE properties
/// such as `tags` or `magmoms`) any array whose first dimension is the atom count is per-atom;
/// in `data` and `key_value_pairs` only 2-D arrays `[atoms, width]` are, 1-D ones are info.
fn add_value(s: &mut Structure, key: &str, v: &Value, top_level: bool) -> Result<(), RowError> {
    let n = s.len();
    // Per-atom strings: `[[s, ...], ...]` with one inner list per atom.
    if let Some(rows) = v.as_array() {
        if n > 0 && rows.len() == n {
            let strs: Option<Vec<Vec<String>>> = rows
                .iter()
                .map(|r| {
                    r.as_array()?
                        .iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .collect();
            if let Some(strs) = strs {
                let width = strs[0].len();
                if width > 0 && strs.iter().all(|r| r.len() == width) {
                    let data = PerAtomData::Str(strs.into_iter().flatten().collect());
                    s.set_array(key, PerAtomArray { width, data })?;
                    return Ok(());
                }
            }
        }
    }
    if let Some(text) = v.as_str() {
        s.info_mut()
            .insert(key.to_string(), InfoValue::Str(text.to_string()));
        return Ok(());
    }
    if let Some(list) = v.as_array() {
        if !list.is_empty() && list.iter().all(Value::is_string) {
            let strs = list
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            s.info_mut()
                .insert(key.to_string(), InfoValue::StrArray(strs));
            return Ok(());
        }
    }
    let Some(nd) = ndarray(v) else {
        return Ok(()); // nested dicts and other objects are not kept
    };
    let all_int = nd.values.iter().all(|x| matches!(x, Scalar::Int(_)));
    let all_bool = nd.values.iter().all(|x| matches!(x, Scalar::Bool(_)));
    let per_atom = n > 0
        && nd.shape.first() == Some(&n)
        && (nd.shape.len() == 2 || (top_level && nd.shape.len() == 1));
    if per_atom {
        let width = nd.shape.get(1).copied().unwrap_or(1);
        if width == 0 {
            return Ok(());
        }
        let data = if all_bool && !nd.values.is_empty() {
            PerAtomData::Bool(nd.values.iter().map(|x| x.as_f64() != 0.0).collect())
        } else if all_int && !nd.values.is_empty() {
            PerAtomData::Int(
                nd.values
                    .iter()
                    .map(|x| match x {
                        Scalar::Int(i) => *i,
                        _ => unreachable!("all values are integers"),
                    })
                    .collect(),
            )
        } else {
            PerAtomData::Real(nd.values.iter().map(|x| x.as_f64()).collect())
        };
        s.set_array(key, PerAtomArray { width, data })?;
        return Ok(());
    }
    let value = match (nd.shape.len(), nd.values.as_slice()) {
        (0, [Scalar::Bool(b)]) => InfoValue::Bool(*b),
        (0, [Scalar::Int(i)]) => InfoValue::Int(*i),
        (0, [Scalar::Float(x)]) => InfoValue::Float(*x),
        (0, _) => return Ok(()),
        _ if all_bool && !nd.values.is_empty() => {
            InfoValue::BoolArray(nd.values.iter().map(|x| x.as_f64() != 0.0).collect())
        }
        _ if all_int && !nd.values.is_empty() => InfoValue::IntArray(
            nd.values
                .iter()
                .map(|x| match x {
                    Scalar::Int(i) => *i,
                    _ => unreachable!("all values are integers"),
                })
                .collect(),
        ),
        _ => InfoValue::FloatArray(nd.values.iter().map(|x| x.as_f64()).collect()),
    };
    s.info_mut().insert(key.to_string(), value);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writing

/// The JSON of ASE's ndarray encoding.
fn nd_json(shape: &[usize], dtype: &str, flat: Value) -> Value {
    json!({ "__ndarray__": [shape, dtype, flat] })
}

fn info_json(v: &InfoValue) -> Value {
    match v {
        InfoValue::Bool(b) => json!(b),
        InfoValue::Int(i) => json!(i),
        InfoValue::Float(x) => json!(x),
        InfoValue::Str(s) => json!(s),
        InfoValue::BoolArray(a) => nd_json(&[a.len()], "bool", json!(a)),
        InfoValue::IntArray(a) => nd_json(&[a.len()], "int64", json!(a)),
        InfoValue::FloatArray(a) => nd_json(&[a.len()], "float64", json!(a)),
        InfoValue::StrArray(a) => json!(a),
    }
}

/// A per-atom array as an ndarray: `[n]` for one value per atom at the top level of a row (as
/// ASE stores `tags` or `magmoms`), `[n, width]` otherwise.
fn array_json(n: usize, a: &PerAtomArray, top_level: bool) -> Value {
    let shape: Vec<usize> = if a.width == 1 && top_level {
        vec![n]
    } else {
        vec![n, a.width]
    };
    match &a.data {
        PerAtomData::Str(v) => json!(v.chunks(a.width.max(1)).collect::<Vec<_>>()),
        PerAtomData::Int(v) => nd_json(&shape, "int64", json!(v)),
        PerAtomData::Real(v) => nd_json(&shape, "float64", json!(v)),
        PerAtomData::Bool(v) => nd_json(&shape, "bool", json!(v)),
    }
}

/// Seconds from the Unix epoch to 2000-01-01 and one Julian year in seconds (ASE's time unit:
/// years since 2000).
const T2000: f64 = 946_681_200.0;
const YEAR: f64 = 31_557_600.0;

/// Encodes one structure as an ASE database row (JSON), the way ASE's JSON encoder does.
pub fn row_json(s: &Structure, unique_id: &str, time: f64) -> Value {
    let n = s.len();
    let mut row = Map::new();
    let numbers: Vec<i64> = s.numbers().iter().map(|&z| i64::from(z)).collect();
    row.insert("numbers".into(), nd_json(&[n], "int64", json!(numbers)));
    let pos: Vec<f64> = s.positions().iter().flatten().copied().collect();
    row.insert("positions".into(), nd_json(&[n, 3], "float64", json!(pos)));
    let cell: Vec<f64> = s.cell().iter().flatten().copied().collect();
    row.insert("cell".into(), nd_json(&[3, 3], "float64", json!(cell)));
    row.insert("pbc".into(), nd_json(&[3], "bool", json!(s.pbc())));
    row.insert("unique_id".into(), json!(unique_id));
    row.insert("ctime".into(), json!(time));
    row.insert("mtime".into(), json!(time));
    row.insert("user".into(), json!("matscale"));
    let has_results = s.energy().is_some() || s.forces().is_some() || s.stress().is_some();
    if has_results {
        row.insert("calculator".into(), json!("unknown"));
        row.insert("calculator_parameters".into(), json!({}));
    }
    if let Some(e) = s.energy() {
        row.insert("energy".into(), json!(e));
    }
    if let Some(f) = s.forces() {
        let flat: Vec<f64> = f.iter().flatten().copied().collect();
        row.insert("forces".into(), nd_json(&[n, 3], "float64", json!(flat)));
    }
    if let Some(st) = s.stress() {
        row.insert(
            "stress".into(),
            nd_json(&[6], "float64", json!(matrix_to_voigt(st))),
        );
    }
    let mut kvp = Map::new();
    let mut data = Map::new();
    for (k, v) in s.info() {
        if ASE_PROPERTIES.contains(&k.as_str()) {
            row.insert(k.clone(), info_json(v));
        } else {
            match v {
                InfoValue::Bool(_)
                | InfoValue::Int(_)
                | InfoValue::Float(_)
                | InfoValue::Str(_) => {
                    kvp.insert(k.clone(), info_json(v));
                }
                _ => {
                    data.insert(k.clone(), info_json(v));
                }
            }
        }
    }
    for (k, a) in s.arrays() {
        if ASE_PROPERTIES.contains(&k.as_str()) || ASE_ATOM_ARRAYS.contains(&k.as_str()) {
            row.insert(k.clone(), array_json(n, a, true));
        } else {
            data.insert(k.clone(), array_json(n, a, false));
        }
    }
    if !kvp.is_empty() {
        row.insert("key_value_pairs".into(), Value::Object(kvp));
    }
    if !data.is_empty() {
        row.insert("data".into(), Value::Object(data));
    }
    Value::Object(row)
}

fn deflate(v: &Value) -> Result<Vec<u8>, std::io::Error> {
    let mut enc = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    serde_json::to_writer(&mut enc, v)?;
    enc.finish()
}

/// Rows written per LMDB transaction.
const ROWS_PER_TXN: usize = 1024;
/// The LMDB map size of written files (virtual address space, not disk), bytes.
const MAP_SIZE: usize = 1 << 40;

/// Writes an ASE LMDB file (ids 1, 2, ... plus `nextid`), atomically: into a temporary file
/// next to the target, renamed by [`Writer::finish`].
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    env: Option<Env>,
    db: Database<Bytes, Bytes>,
    pending: Vec<(u64, Vec<u8>)>,
    written: usize,
    metadata: Option<Value>,
    seed: u64,
}

impl Writer {
    /// Starts writing to `path` (nothing appears there until [`Writer::finish`]).
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        let tmp = temp_path(path);
        let dberr = |e: heed::Error| WriteError::Database {
            path: tmp.clone(),
            message: e.to_string(),
        };
        // A stale temporary file from a killed run would be appended to: start afresh.
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(lock_path(&tmp));
        let mut options = EnvOpenOptions::new();
        options.map_size(MAP_SIZE).max_dbs(1);
        // SAFETY: NO_SUB_DIR only changes the file layout (one file plus `-lock`).
        unsafe {
            options.flags(EnvFlags::NO_SUB_DIR);
        }
        // SAFETY: the temporary file is private to this writer (its name holds our pid) and is
        // modified only through this environment.
        let env = unsafe { options.open(&tmp) }.map_err(dberr)?;
        let mut wtxn = env.write_txn().map_err(dberr)?;
        let db: Database<Bytes, Bytes> = env.create_database(&mut wtxn, None).map_err(dberr)?;
        wtxn.commit().map_err(dberr)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            env: Some(env),
            db,
            pending: Vec::new(),
            written: 0,
            metadata: None,
            seed,
        })
    }

    /// Sets the `metadata` entry written by [`Writer::finish`].
    pub fn set_metadata(&mut self, metadata: Value) {
        self.metadata = Some(metadata);
    }

    fn unique_id(&mut self) -> String {
        // splitmix64: a unique-enough 128-bit hex id without a dependency.
        let mut next = || {
            self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        format!("{:016x}{:016x}", next(), next())
    }

    /// Appends one structure as the next row.
    pub fn write(&mut self, s: &Structure) -> Result<(), WriteError> {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d.as_secs_f64() - T2000) / YEAR)
            .unwrap_or(0.0);
        let uid = self.unique_id();
        let row = row_json(s, &uid, time);
        let bytes = deflate(&row).map_err(|e| WriteError::io(&self.tmp, e))?;
        let id = (self.written + self.pending.len() + 1) as u64;
        self.pending.push((id, bytes));
        if self.pending.len() >= ROWS_PER_TXN {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), WriteError> {
        let dberr = |e: heed::Error| WriteError::Database {
            path: self.tmp.clone(),
            message: e.to_string(),
        };
        let env = self
            .env
            .as_ref()
            .expect("the environment stays open until finish");
        let mut wtxn = env.write_txn().map_err(dberr)?;
        for (id, bytes) in &self.pending {
            self.db
                .put(&mut wtxn, id.to_string().as_bytes(), bytes)
                .map_err(dberr)?;
        }
        let nextid = self.written + self.pending.len() + 1;
        let next = deflate(&json!(nextid)).map_err(|e| WriteError::io(&self.tmp, e))?;
        self.db.put(&mut wtxn, b"nextid", &next).map_err(dberr)?;
        wtxn.commit().map_err(dberr)?;
        self.written += self.pending.len();
        self.pending.clear();
        Ok(())
    }

    /// Writes the remaining rows, `nextid` and `metadata`, closes the environment and moves the
    /// file into place. Returns the number of rows written.
    pub fn finish(mut self) -> Result<usize, WriteError> {
        self.flush()?;
        if let Some(meta) = self.metadata.take() {
            let dberr = |e: heed::Error| WriteError::Database {
                path: self.tmp.clone(),
                message: e.to_string(),
            };
            let env = self
                .env
                .as_ref()
                .expect("the environment stays open until finish");
            let mut wtxn = env.write_txn().map_err(dberr)?;
            let bytes = deflate(&meta).map_err(|e| WriteError::io(&self.tmp, e))?;
            self.db.put(&mut wtxn, b"metadata", &bytes).map_err(dberr)?;
            wtxn.commit().map_err(dberr)?;
        }
        let env = self
            .env
            .take()
            .expect("the environment stays open until finish");
        env.force_sync().map_err(|e| WriteError::Database {
            path: self.tmp.clone(),
            message: e.to_string(),
        })?;
        env.prepare_for_closing().wait();
        std::fs::rename(&self.tmp, &self.path).map_err(|e| WriteError::io(&self.path, e))?;
        let _ = std::fs::remove_file(lock_path(&self.tmp));
        Ok(self.written)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(env) = self.env.take() {
            // Not finished: close and leave no partial file behind.
            env.prepare_for_closing().wait();
            let _ = std::fs::remove_file(&self.tmp);
            let _ = std::fs::remove_file(lock_path(&self.tmp));
        }
    }
}

/// LMDB's lock file of a single-file environment.
fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push("-lock");
    PathBuf::from(name)
}

/// Writes structures to an ASE LMDB file (see [`Writer`]); returns the number of rows.
pub fn write_all(path: &Path, frames: &[Structure]) -> Result<usize, WriteError> {
    let mut w = Writer::create(path)?;
    for s in frames {
        w.write(s)?;
    }
    w.finish()
}

/// The info keys that the writer stores as ASE calculator properties at the top level of a row.
pub fn ase_property_names() -> &'static [&'static str] {
    &ASE_PROPERTIES
}
