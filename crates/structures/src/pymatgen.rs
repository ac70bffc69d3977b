//! pymatgen Structure JSON, as used by mlearn, MPtrj and Alexandria, streamed row by row.
//!
//! Accepted layouts of a `.json` file:
//! - a list of rows (mlearn's `training.json`/`test.json`, or a list of entries / structures);
//! - `{"entries": [...]}` (an Alexandria file of `ComputedStructureEntry` dicts);
//! - `{material_id: {frame_id: row}}` (MPtrj's `MPtrj_2022.9_full.json`);
//! - a single row, entry or Structure dict.
//!
//! A row is a Structure dict (`lattice.matrix` rows are the lattice vectors, `sites[].species`,
//! `sites[].xyz` Cartesian Å or `sites[].abc` fractional) or a dict holding one under
//! `"structure"`, with labels in one of these conventions:
//!
//! | source     | energy (eV, total)            | forces (eV/Å)     | stress                                  |
//! |------------|-------------------------------|-------------------|-----------------------------------------|
//! | mlearn     | `outputs.energy`              | `outputs.forces`  | `outputs.virial_stress`: 6 values, kBar, VASP sign, order see [`StressOrder`] |
//! | MPtrj      | `uncorrected_total_energy`    | `force`           | `stress`: 3x3, kBar, VASP sign          |
//! | Alexandria | `energy` (uncorrected)        | `data.forces`     | `data.stress`: 3x3, kBar, VASP sign     |
//!
//! Stresses are converted to eV/Å^3 with the ASE sign (σ_ASE = −σ_kBar / 1602.1766208).
//! Other scalar fields (`group`, `description`, `corrected_total_energy`, `energy_per_atom`,
//! `mp_id`, `correction`, ...) go to [`Structure::info`]; per-atom lists of numbers (`magmom`,
//! site `properties`) to [`Structure::arrays`]. Partially occupied or mixed sites are rejected.
//!
//! The file is parsed on a background thread that hands rows over through a bounded channel, so
//! memory stays bounded by a few rows whatever the file size.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::elements;
use crate::io::{Location, ReadError};
use crate::structure::{vec_mat, Mat3};
use crate::units::vasp_kbar_to_ase;
use crate::{InfoValue, PerAtomArray, PerAtomData, Structure};

/// The order of the six components of mlearn's `virial_stress`.
///
/// mlearn's own data sets disagree: checked on the `Elastic` rows of the shipped files (cells
/// sheared in one plane have one large off-diagonal stress), Si uses VASP's order and Mo, Cu and
/// Ni use LAMMPS's. See docs/FORMATS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StressOrder {
    /// xx, yy, zz, xy, yz, zx (VASP's OUTCAR order; mlearn Si).
    #[default]
    Vasp,
    /// xx, yy, zz, xy, xz, yz (LAMMPS's order; mlearn Mo, Cu, Ni).
    Lammps,
    /// xx, yy, zz, yz, xz, xy (ASE's Voigt order).
    Voigt,
}

impl StressOrder {
    /// The 3x3 matrix of six values given in this order.
    pub fn to_matrix(self, v: &[f64; 6]) -> Mat3 {
        let (xy, yz, xz) = match self {
            Self::Vasp => (v[3], v[4], v[5]),
            Self::Lammps => (v[3], v[5], v[4]),
            Self::Voigt => (v[5], v[3], v[4]),
        };
        [[v[0], xy, xz], [xy, v[1], yz], [xz, yz, v[2]]]
    }
}

/// Options of the pymatgen JSON reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// The component order of mlearn's 6-value `virial_stress`.
    pub mlearn_stress_order: StressOrder,
}

/// Rows held in the channel between the parsing thread and the consumer.
const CHANNEL_ROWS: usize = 64;

/// Opens a pymatgen JSON file for streaming with default [`Options`].
pub fn read_path(path: &Path) -> Result<Reader, ReadError> {
    read_path_with(path, Options::default())
}

/// Opens a pymatgen JSON file for streaming.
pub fn read_path_with(path: &Path, options: Options) -> Result<Reader, ReadError> {
    let file = File::open(path).map_err(|e| ReadError::io(path, e))?;
    read_reader(file, path, options)
}

/// Streams pymatgen JSON from any reader (parsed on a background thread); `path` names the
/// source in error messages.
pub fn read_reader<R: std::io::Read + Send + 'static>(
    src: R,
    path: &Path,
    options: Options,
) -> Result<Reader, ReadError> {
    let (tx, rx) = sync_channel(CHANNEL_ROWS);
    let thread_path = path.to_path_buf();
    std::thread::Builder::new()
        .name("pymatgen-json".into())
        .spawn(move || {
            let src = std::io::BufReader::with_capacity(1 << 20, src);
            parse_stream(src, thread_path, options, tx);
        })
        .map_err(|e| ReadError::io(path, e))?;
    Ok(Reader { rx, done: false })
}

/// Parses pymatgen JSON held in memory; `path` is only used in messages.
pub fn parse_str(text: &str, path: &Path, options: Options) -> Result<Vec<Structure>, ReadError> {
    let (tx, rx) = sync_channel(CHANNEL_ROWS);
    std::thread::scope(|scope| {
        scope.spawn(move || parse_stream(text.as_bytes(), path.to_path_buf(), options, tx));
        Reader { rx, done: false }.collect()
    })
}

/// A streaming iterator over the structures of a pymatgen JSON file. Ends after the first error.
pub struct Reader {
    rx: Receiver<Result<Structure, ReadError>>,
    done: bool,
}

impl Iterator for Reader {
    type Item = Result<Structure, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.rx.recv().ok()?;
        if item.is_err() {
            self.done = true;
        }
        Some(item)
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pymatgen::Reader { .. }")
    }
}

/// The state shared by the visitors of one file.
struct Sink {
    path: PathBuf,
    options: Options,
    tx: SyncSender<Result<Structure, ReadError>>,
    frame: usize,
    /// The consumer hung up or an error was sent: stop parsing.
    stopped: bool,
}

impl Sink {
    fn loc(&self) -> Location {
        Location::file(&self.path).with_frame(self.frame)
    }

    /// Converts and sends one row; `context` adds info entries (e.g. MPtrj ids).
    fn emit(&mut self, row: Value, context: &[(&str, &str)]) {
        if self.stopped {
            return;
        }
        let result = row_to_structure(&row, self.options).map_err(|(key, message)| match message {
            RowError::Parse(m) => ReadError::parse(self.loc().with_key(key), m),
            RowError::Structure(e) => ReadError::structure(self.loc().with_key(key), e),
        });
        let result = result.map(|mut s| {
            for (k, v) in context {
                s.info_mut()
                    .insert((*k).to_string(), InfoValue::Str((*v).to_string()));
            }
            s
        });
        let failed = result.is_err();
        if self.tx.send(result).is_err() || failed {
            self.stopped = true;
        }
        self.frame += 1;
    }

    fn fail(&mut self, e: ReadError) {
        if !self.stopped {
            let _ = self.tx.send(Err(e));
            self.stopped = true;
        }
    }
}

/// Marker message of the serde error raised to abort parsing once the sink has stopped.
const STOPPED: &str = "matscale: reading stopped";

fn parse_stream<R: std::io::Read>(
    src: R,
    path: PathBuf,
    options: Options,
    tx: SyncSender<Result<Structure, ReadError>>,
) {
    let mut sink = Sink {
        path,
        options,
        tx,
        frame: 0,
        stopped: false,
    };
    let mut de = serde_json::Deserializer::from_reader(src);
    let result = TopLevel { sink: &mut sink }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if let Err(e) = result {
        if !sink.stopped || e.to_string() != STOPPED {
            let loc = Location::file(&sink.path)
                .with_frame(sink.frame)
                .with_line(e.line());
            sink.fail(ReadError::parse(loc, format!("invalid JSON: {e}")));
        }
    }
}

fn stop_if<E: serde::de::Error>(sink: &Sink) -> Result<(), E> {
    if sink.stopped {
        Err(E::custom(STOPPED))
    } else {
        Ok(())
    }
}

/// The top-level value: a list of rows, or a dict of one of several kinds.
struct TopLevel<'a> {
    sink: &'a mut Sink,
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of structures or a dict")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        RowList { sink: self.sink }.visit_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Keys of a single row / Structure dict are kept and emitted at the end; `entries`
        // (Alexandria) is streamed; a dict of dicts of rows (MPtrj) is emitted material by
        // material.
        let mut single = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "entries" {
                map.next_value_seed(RowList {
                    sink: &mut *self.sink,
                })?;
                continue;
            }
            let value: Value = map.next_value()?;
            match value {
                Value::Object(frames) if is_trajectory_group(&frames) => {
                    for (frame_id, row) in frames {
                        self.sink
                            .emit(row, &[("material_id", &key), ("frame_id", &frame_id)]);
                        stop_if(self.sink)?;
                    }
                }
                other => {
                    single.insert(key, other);
                }
            }
        }
        let meta_only = single.keys().all(|k| k.starts_with('@'));
        if !single.is_empty() && !meta_only {
            self.sink.emit(Value::Object(single), &[]);
        }
        stop_if(self.sink)
    }
}

/// A dict whose values are all rows holding a `structure` (an MPtrj material).
fn is_trajectory_group(m: &Map<String, Value>) -> bool {
    !m.is_empty()
        && m.values()
            .all(|v| v.as_object().is_some_and(|o| o.contains_key("structure")))
}

/// A list of rows, emitted one by one.
struct RowList<'a> {
    sink: &'a mut Sink,
}

impl<'de> DeserializeSeed<'de> for RowList<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowList<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(row) = seq.next_element::<Value>()? {
            self.sink.emit(row, &[]);
            stop_if(self.sink)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// One row

enum RowError {
    Parse(String),
    Structure(crate::StructureError),
}

type RowResult<T> = Result<T, (String, RowError)>;

fn perr<T>(key: &str, message: impl Into<String>) -> RowResult<T> {
    Err((key.to_string(), RowError::Parse(message.into())))
}

fn serr(key: &str) -> impl Fn(crate::StructureError) -> (String, RowError) + '_ {
    move |e| (key.to_string(), RowError::Structure(e))
}

fn as_f64(v: &Value, key: &str) -> RowResult<f64> {
    match v.as_f64() {
        Some(x) => Ok(x),
        None => perr(key, format!("expected a number, found {}", short(v))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

fn vec3(v: &Value, key: &str) -> RowResult<[f64; 3]> {
    match v.as_array() {
        Some(a) if a.len() == 3 => Ok([
            as_f64(&a[0], key)?,
            as_f64(&a[1], key)?,
            as_f64(&a[2], key)?,
        ]),
        _ => perr(key, format!("expected 3 numbers, found {}", short(v))),
    }
}

fn mat3(v: &Value, key: &str) -> RowResult<Mat3> {
    match v.as_array() {
        Some(rows) if rows.len() == 3 => Ok([
            vec3(&rows[0], key)?,
            vec3(&rows[1], key)?,
            vec3(&rows[2], key)?,
        ]),
        _ => perr(key, format!("expected a 3x3 matrix, found {}", short(v))),
    }
}

fn vec3_list(v: &Value, key: &str, n: usize) -> RowResult<Vec<[f64; 3]>> {
    let Some(a) = v.as_array() else {
        return perr(
            key,
            format!("expected a list of 3-vectors, found {}", short(v)),
        );
    };
    if a.len() != n {
        return perr(
            key,
            format!("expected {n} 3-vectors (one per atom), found {}", a.len()),
        );
    }
    a.iter()
        .enumerate()
        .map(|(i, x)| vec3(x, &format!("{key}[{i}]")))
        .collect()
}

/// The element symbol of a species entry (`"Fe"`, or `"Fe2+"` with an oxidation state).
fn species_symbol(sp: &Map<String, Value>, key: &str) -> RowResult<u8> {
    let Some(name) = sp.get("element").and_then(Value::as_str) else {
        return perr(key, "species entry without an `element` string");
    };
    let bare = name.trim_end_matches(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
    match elements::atomic_number(bare) {
        Some(z) => Ok(z),
        None => Err((
            key.to_string(),
            RowError::Structure(crate::StructureError::UnknownElement(name.to_string())),
        )),
    }
}

/// Builds the bare structure (no labels) from a pymatgen Structure dict.
fn parse_structure(d: &Value) -> RowResult<Structure> {
    let Some(d) = d.as_object() else {
        return perr("structure", "expected a Structure dict");
    };
    let matrix = match d.get("lattice") {
        Some(Value::Object(l)) => match l.get("matrix") {
            Some(m) => mat3(m, "lattice.matrix")?,
            None => return perr("lattice.matrix", "lattice without `matrix`"),
        },
        // Molecule dicts have no lattice.
        None | Some(Value::Null) => [[0.0; 3]; 3],
        Some(other) => {
            return perr(
                "lattice",
                format!("expected a dict, found {}", short(other)),
            )
        }
    };
    let pbc = match d
        .get("lattice")
        .and_then(|l| l.get("pbc"))
        .and_then(Value::as_array)
    {
        Some(p) if p.len() == 3 => [
            p[0].as_bool().unwrap_or(true),
            p[1].as_bool().unwrap_or(true),
            p[2].as_bool().unwrap_or(true),
        ],
        _ => [d.get("lattice").is_some_and(|l| !l.is_null()); 3],
    };
    let Some(sites) = d.get("sites").and_then(Value::as_array) else {
        return perr("sites", "Structure dict without a `sites` list");
    };
    let mut numbers = Vec::with_capacity(sites.len());
    let mut positions = Vec::with_capacity(sites.len());
    let mut site_props: Vec<(String, Vec<f64>)> = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let key = format!("sites[{i}]");
        let Some(site) = site.as_object() else {
            return perr(&key, "expected a site dict");
        };
        let species = match site.get("species").and_then(Value::as_array) {
            Some(s) => s,
            None => return perr(&format!("{key}.species"), "site without a `species` list"),
        };
        let [sp] = species.as_slice() else {
            return perr(
                &format!("{key}.species"),
                format!(
                    "disordered site with {} species: partial occupancies are not supported",
                    species.len()
                ),
            );
        };
        let Some(sp) = sp.as_object() else {
            return perr(&format!("{key}.species"), "expected a species dict");
        };
        let z = species_symbol(sp, &format!("{key}.species"))?;
        let occu = match sp.get("occu") {
            Some(o) => as_f64(o, &format!("{key}.species.occu"))?,
            None => 1.0,
        };
        if (occu - 1.0).abs() > 1e-6 {
            return perr(
                &format!("{key}.species.occu"),
                format!("partial occupancy {occu}: only fully occupied sites are supported"),
            );
        }
        numbers.push(z);
        let r = if let Some(xyz) = site.get("xyz") {
            vec3(xyz, &format!("{key}.xyz"))?
        } else if let Some(abc) = site.get("abc") {
            vec_mat(&vec3(abc, &format!("{key}.abc"))?, &matrix)
        } else {
            return perr(&key, "site with neither `xyz` nor `abc`");
        };
        positions.push(r);
        if let Some(Value::Object(props)) = site.get("properties") {
            for (name, v) in props {
                if let Some(x) = v.as_f64() {
                    match site_props.iter_mut().find(|(n, _)| n == name) {
                        Some((_, vals)) => vals.push(x),
                        None if i == 0 => site_props.push((name.clone(), vec![x])),
                        None => {}
                    }
                }
            }
        }
    }
    let mut s = Structure::new(numbers, positions, matrix, pbc).map_err(serr("structure"))?;
    for (name, vals) in site_props {
        if vals.len() == s.len() {
            s.set_array(
                &name,
                PerAtomArray {
                    width: 1,
                    data: PerAtomData::Real(vals),
                },
            )
            .map_err(serr("sites.properties"))?;
        }
    }
    Ok(s)
}

/// Stress given as 3x3 in kBar with the VASP sign (MPtrj, Alexandria) → eV/Å^3, ASE sign.
fn kbar_matrix(v: &Value, key: &str) -> RowResult<Mat3> {
    let m = mat3(v, key)?;
    Ok(m.map(|row| row.map(vasp_kbar_to_ase)))
}

/// Converts one row (mlearn, MPtrj, Alexandria entry or bare Structure dict).
fn row_to_structure(row: &Value, options: Options) -> RowResult<Structure> {
    let Some(obj) = row.as_object() else {
        return perr("", format!("expected a dict, found {}", short(row)));
    };
    let is_structure = obj.contains_key("sites");
    let mut s = if is_structure {
        parse_structure(row)?
    } else if let Some(st) = obj.get("structure") {
        parse_structure(st).map_err(|(k, e)| (format!("structure.{k}"), e))?
    } else {
        return perr("", "neither a Structure dict nor a row with a `structure`");
    };
    if is_structure {
        return Ok(s);
    }
    let n = s.len();
    let mut used: Vec<&str> = vec!["structure"];

    if let Some(Value::Object(out)) = obj.get("outputs") {
        // mlearn
        used.push("outputs");
        if let Some(e) = out.get("energy") {
            s.set_energy(as_f64(e, "outputs.energy")?)
                .map_err(serr("outputs.energy"))?;
        }
        if let Some(f) = out.get("forces") {
            s.set_forces(vec3_list(f, "outputs.forces", n)?)
                .map_err(serr("outputs.forces"))?;
        }
        if let Some(v) = out.get("virial_stress") {
            let key = "outputs.virial_stress";
            let vals = match v.as_array() {
                Some(a) if a.len() == 6 => {
                    let mut x = [0.0; 6];
                    for (xi, ai) in x.iter_mut().zip(a) {
                        *xi = as_f64(ai, key)?;
                    }
                    x
                }
                _ => return perr(key, format!("expected 6 numbers, found {}", short(v))),
            };
            let m = options.mlearn_stress_order.to_matrix(&vals);
            s.set_stress(m.map(|r| r.map(vasp_kbar_to_ase)))
                .map_err(serr(key))?;
        }
    } else if obj.contains_key("uncorrected_total_energy") || obj.contains_key("force") {
        // MPtrj
        if let Some(e) = obj.get("uncorrected_total_energy") {
            used.push("uncorrected_total_energy");
            s.set_energy(as_f64(e, "uncorrected_total_energy")?)
                .map_err(serr("uncorrected_total_energy"))?;
        }
        if let Some(f) = obj.get("force") {
            used.push("force");
            s.set_forces(vec3_list(f, "force", n)?)
                .map_err(serr("force"))?;
        }
        if let Some(st) = obj.get("stress") {
            used.push("stress");
            s.set_stress(kbar_matrix(st, "stress")?)
                .map_err(serr("stress"))?;
        }
    } else if let Some(e) = obj.get("energy") {
        // ComputedStructureEntry (Alexandria): `energy` is the uncorrected total energy.
        used.push("energy");
        s.set_energy(as_f64(e, "energy")?).map_err(serr("energy"))?;
        if let Some(Value::Object(data)) = obj.get("data") {
            if let Some(f) = data.get("forces") {
                s.set_forces(vec3_list(f, "data.forces", n)?)
                    .map_err(serr("data.forces"))?;
            }
            if let Some(st) = data.get("stress") {
                s.set_stress(kbar_matrix(st, "data.stress")?)
                    .map_err(serr("data.stress"))?;
            }
            for (k, v) in data {
                if k != "forces" && k != "stress" {
                    add_extra(&mut s, k, v);
                }
            }
        }
        used.push("data");
    }
    for (k, v) in obj {
        if !used.contains(&k.as_str()) && !k.starts_with('@') {
            add_extra(&mut s, k, v);
        }
    }
    Ok(s)
}

/// Keeps a scalar or numeric list as info, or a per-atom list of numbers as an array.
fn add_extra(s: &mut Structure, key: &str, v: &Value) {
    let value = match v {
        Value::Bool(b) => InfoValue::Bool(*b),
        Value::Number(x) => match x.as_i64() {
            Some(i) => InfoValue::Int(i),
            None => match x.as_f64() {
                Some(f) => InfoValue::Float(f),
                None => return,
            },
        },
        Value::String(t) => InfoValue::Str(t.clone()),
        Value::Array(a) => {
            let nums: Option<Vec<f64>> = a.iter().map(Value::as_f64).collect();
            match nums {
                Some(vals) if vals.len() == s.len() && !s.is_empty() => {
                    let name = if key == "magmom" { "magmoms" } else { key };
                    let arr = PerAtomArray {
                        width: 1,
                        data: PerAtomData::Real(vals),
                    };
                    // A non-finite per-atom value is dropped rather than failing the row.
                    let _ = s.set_array(name, arr);
                    return;
                }
                Some(vals) => InfoValue::FloatArray(vals),
                None => return,
            }
        }
        Value::Null | Value::Object(_) => return,
    };
    s.info_mut().insert(key.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Structure>, ReadError> {
        parse_str(text, Path::new("t.json"), Options::default())
    }

    const SITE: &str =
        r#"{"species": [{"element": "Cu", "occu": 1}], "abc": [0.5, 0.5, 0.5], "label": "Cu"}"#;

    fn structure(sites: &str) -> String {
        format!(
            r#"{{"@module": "pymatgen.core.structure", "@class": "Structure", "lattice": {{"matrix": [[2, 0, 0], [0, 3, 0], [0, 0, 4]]}}, "sites": [{sites}]}}"#
        )
    }

    #[test]
    fn single_structure_fractional() {
        let s = parse(&structure(SITE)).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].positions()[0], [1.0, 1.5, 2.0]);
        assert_eq!(s[0].numbers(), &[29]);
        assert_eq!(s[0].pbc(), [true; 3]);
    }

    #[test]
    fn mlearn_row_units_and_order() {
        let row = format!(
            r#"[{{"structure": {}, "outputs": {{"energy": -3.5, "forces": [[0.1, 0.2, 0.3]], "virial_stress": [1, 2, 3, 4, 5, 6]}}, "group": "Elastic", "num_atoms": 1}}]"#,
            structure(SITE)
        );
        let s = &parse(&row).unwrap()[0];
        assert_eq!(s.energy(), Some(-3.5));
        let k = crate::units::KBAR;
        let st = s.stress().unwrap();
        // VASP order xx yy zz xy yz zx, VASP sign.
        assert!((st[0][1] + 4.0 * k).abs() < 1e-15);
        assert!((st[1][2] + 5.0 * k).abs() < 1e-15);
        assert!((st[0][2] + 6.0 * k).abs() < 1e-15);
        assert_eq!(s.info()["group"], InfoValue::Str("Elastic".into()));
        let lammps = parse_str(
            &row,
            Path::new("t.json"),
            Options {
                mlearn_stress_order: StressOrder::Lammps,
            },
        )
        .unwrap();
        let st = lammps[0].stress().unwrap();
        assert!((st[0][2] + 5.0 * k).abs() < 1e-15);
        assert!((st[1][2] + 6.0 * k).abs() < 1e-15);
    }

    #[test]
    fn mptrj_nested_and_alexandria_entries() {
        let row = format!(
            r#"{{"structure": {}, "uncorrected_total_energy": -4.0, "corrected_total_energy": -4.5, "energy_per_atom": -4.5, "force": [[0, 0, 1]], "stress": [[10, 0, 0], [0, 10, 0], [0, 0, 10]], "magmom": [0.5], "mp_id": "mp-30"}}"#,
            structure(SITE)
        );
        let mptrj = format!(r#"{{"mp-30": {{"task-0": {row}, "task-1": {row}}}}}"#);
        let s = parse(&mptrj).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].energy(), Some(-4.0));
        assert_eq!(s[1].info()["frame_id"], InfoValue::Str("task-1".into()));
        assert_eq!(
            s[1].info()["corrected_total_energy"],
            InfoValue::Float(-4.5)
        );
        assert!((s[0].stress().unwrap()[2][2] + 10.0 * crate::units::KBAR).abs() < 1e-15);
        assert!(s[0].arrays().contains_key("magmoms"));

        let entry = format!(
            r#"{{"@class": "ComputedStructureEntry", "energy": -7.25, "correction": -0.5, "structure": {}, "data": {{"e_form": -0.1}}}}"#,
            structure(SITE)
        );
        let file = format!(r#"{{"@module": "x", "entries": [{entry}, {entry}]}}"#);
        let s = parse(&file).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].energy(), Some(-7.25));
        assert_eq!(s[0].info()["correction"], InfoValue::Float(-0.5));
        assert_eq!(s[0].info()["e_form"], InfoValue::Float(-0.1));
    }

    #[test]
    fn errors_name_frame_and_field() {
        let partial = SITE.replace(r#""occu": 1"#, r#""occu": 0.5"#);
        let text = format!("[{}, {}]", structure(SITE), structure(&partial));
        let err = parse(&text).unwrap_err();
        let loc = err.location().unwrap();
        assert_eq!(loc.frame, Some(1));
        assert!(err.to_string().contains("partial occupancy"), "{err}");
        assert!(loc.key.as_deref().unwrap().contains("sites[0]"), "{err}");

        let bad = SITE.replace("Cu", "Qq");
        let err = parse(&structure(&bad)).unwrap_err();
        assert!(err.to_string().contains("Qq"), "{err}");

        let err = parse("[{\"sites\": [").unwrap_err();
        assert!(err.to_string().contains("invalid JSON"), "{err}");
        assert!(err.location().unwrap().line.is_some());
    }
}
