//! The runs table: one row per finished training run.
//!
//! The format is documented in `docs/RUNS_TABLE.md`. Two encodings carry the
//! same columns: CSV with a header, and JSON lines (one object per line).
//! A third, import-only format reads the Chinchilla points extracted by
//! Besiroglu et al. (2024) (`Model Size`, `Training FLOP`, `loss`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Column names of the native format.
pub mod columns {
    /// Model family (string): groups runs for per-family fits.
    pub const MODEL: &str = "model";
    /// Parameter count N.
    pub const PARAMS: &str = "params";
    /// Training-set size D in structures.
    pub const TRAIN_STRUCTURES: &str = "train_structures";
    /// Training-set size in atoms (optional).
    pub const TRAIN_ATOMS: &str = "train_atoms";
    /// Training compute C in FLOPs.
    pub const FLOPS: &str = "flops";
    /// Best validation loss (the study's weighted sum).
    pub const VAL_LOSS: &str = "val_loss";
    /// Energy term of the best validation loss (optional).
    pub const VAL_ENERGY: &str = "val_energy";
    /// Force term of the best validation loss (optional).
    pub const VAL_FORCE: &str = "val_force";
    /// Stress term of the best validation loss (optional).
    pub const VAL_STRESS: &str = "val_stress";
    /// k in C = k·N·D: training FLOPs per parameter per training structure (optional).
    pub const FLOPS_PER_PARAM_SAMPLE: &str = "flops_per_param_sample";
    /// Every column of the native format, in the order the sweep writes them.
    pub const ALL: [&str; 10] = [
        MODEL,
        PARAMS,
        TRAIN_STRUCTURES,
        TRAIN_ATOMS,
        FLOPS,
        VAL_LOSS,
        VAL_ENERGY,
        VAL_FORCE,
        VAL_STRESS,
        FLOPS_PER_PARAM_SAMPLE,
    ];
}

/// One finished training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Model family ("equiformer_v2", "schnet", ...).
    pub model: String,
    /// Parameter count N.
    pub params: f64,
    /// Training-set size D in structures.
    pub train_structures: f64,
    /// Training-set size in atoms.
    pub train_atoms: Option<f64>,
    /// Training compute C in FLOPs.
    pub flops: f64,
    /// Best validation loss (dimensionless weighted sum of MAE terms).
    pub val_loss: f64,
    /// Energy term of the best validation loss.
    pub val_energy: Option<f64>,
    /// Force term of the best validation loss.
    pub val_force: Option<f64>,
    /// Stress term of the best validation loss.
    pub val_stress: Option<f64>,
    /// k in C = k·N·D (FLOPs per parameter per training structure, all epochs included).
    pub flops_per_param_sample: Option<f64>,
    /// Free-form keys (seed, precision, ...), kept as text.
    pub extra: BTreeMap<String, String>,
    /// 1-based line of the row in its source file (0 for rows built in code).
    #[serde(default)]
    pub line: u64,
}

impl Run {
    /// A run with the required fields; optional fields empty.
    pub fn new(model: &str, params: f64, train_structures: f64, flops: f64, val_loss: f64) -> Self {
        Run {
            model: model.to_string(),
            params,
            train_structures,
            train_atoms: None,
            flops,
            val_loss,
            val_energy: None,
            val_force: None,
            val_stress: None,
            flops_per_param_sample: None,
            extra: BTreeMap::new(),
            line: 0,
        }
    }

    /// k = C / (N·D): the stored value if present, otherwise derived.
    pub fn k(&self) -> f64 {
        self.flops_per_param_sample
            .unwrap_or(self.flops / (self.params * self.train_structures))
    }

    /// Checks every numeric field: required ones finite and > 0, loss
    /// components finite and ≥ 0.
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |column: &str, message: String| Error::InvalidValue {
            path: path.to_path_buf(),
            line: self.line,
            column: column.to_string(),
            message,
        };
        if self.model.trim().is_empty() {
            return Err(bad(columns::MODEL, "empty model family".into()));
        }
        let positive = [
            (columns::PARAMS, Some(self.params)),
            (columns::TRAIN_STRUCTURES, Some(self.train_structures)),
            (columns::TRAIN_ATOMS, self.train_atoms),
            (columns::FLOPS, Some(self.flops)),
            (columns::VAL_LOSS, Some(self.val_loss)),
            (columns::FLOPS_PER_PARAM_SAMPLE, self.flops_per_param_sample),
        ];
        for (column, value) in positive {
            if let Some(v) = value {
                if !v.is_finite() || v <= 0.0 {
                    return Err(bad(column, format!("{v} is not a finite positive number")));
                }
            }
        }
        let non_negative = [
            (columns::VAL_ENERGY, self.val_energy),
            (columns::VAL_FORCE, self.val_force),
            (columns::VAL_STRESS, self.val_stress),
        ];
        for (column, value) in non_negative {
            if let Some(v) = value {
                if !v.is_finite() || v < 0.0 {
                    return Err(bad(
                        column,
                        format!("{v} is not a finite non-negative number"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Encoding of a runs table on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    /// Native columns as CSV with a header line.
    Csv,
    /// Native columns as JSON lines.
    Jsonl,
    /// The Besiroglu et al. (2024) extraction of Chinchilla's Figure 4
    /// (`Model Size`, `Training FLOP`, `loss`); D = C / (6N), k = 6.
    Chinchilla,
}

/// A validated table of runs.
#[derive(Debug, Clone, Serialize)]
pub struct RunsTable {
    runs: Vec<Run>,
    source: PathBuf,
    data_unit: String,
}

impl RunsTable {
    /// Builds a table from runs made in code, validating every row
    /// (rows are named by their index, 1-based, in errors).
    pub fn new(runs: Vec<Run>) -> Result<Self> {
        let source = PathBuf::from("<memory>");
        let mut runs = runs;
        for (i, run) in runs.iter_mut().enumerate() {
            if run.line == 0 {
                run.line = i as u64 + 1;
            }
            run.validate(&source)?;
        }
        Ok(RunsTable {
            runs,
            source,
            data_unit: "structures".into(),
        })
    }

    /// Reads a table, detecting the format when `format` is `None`:
    /// `.jsonl`/`.json` or a first character `{` means JSON lines; a CSV
    /// header with `Model Size` and `Training FLOP` means the Chinchilla import.
    pub fn read(path: &Path, format: Option<TableFormat>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path, format)
    }

    /// Parses a table held in memory; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path, format: Option<TableFormat>) -> Result<Self> {
        let format = format.unwrap_or_else(|| detect_format(text, path));
        let runs = match format {
            TableFormat::Csv => parse_native_csv(text, path)?,
            TableFormat::Jsonl => parse_jsonl(text, path)?,
            TableFormat::Chinchilla => parse_chinchilla(text, path)?,
        };
        if runs.is_empty() {
            return Err(Error::Empty(format!(" in {}", path.display())));
        }
        for run in &runs {
            run.validate(path)?;
        }
        Ok(RunsTable {
            runs,
            source: path.to_path_buf(),
            data_unit: if format == TableFormat::Chinchilla {
                "tokens".into()
            } else {
                "structures".into()
            },
        })
    }

    /// The runs, in file order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The file the table came from (`<memory>` for tables built in code).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// What the training-set size D counts: "structures", or "tokens" for
    /// the Chinchilla import.
    pub fn data_unit(&self) -> &str {
        &self.data_unit
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// True when the table has no runs (never for a table that was read).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Model families, sorted.
    pub fn families(&self) -> Vec<String> {
        let mut f: Vec<String> = self.runs.iter().map(|r| r.model.clone()).collect();
        f.sort();
        f.dedup();
        f
    }

    /// The runs of one family.
    pub fn family(&self, model: &str) -> Vec<&Run> {
        self.runs.iter().filter(|r| r.model == model).collect()
    }

    /// Drops the `k` runs with the highest validation loss (Besiroglu et al.
    /// drop the 5 highest-loss Chinchilla points); returns the kept table and
    /// the dropped runs. Ties are broken by file order (earlier rows dropped first).
    pub fn exclude_top_loss(&self, k: usize) -> Result<(RunsTable, Vec<Run>)> {
        if k >= self.runs.len() {
            return Err(Error::InvalidArgument(format!(
                "cannot exclude {k} of {} runs",
                self.runs.len()
            )));
        }
        let mut order: Vec<usize> = (0..self.runs.len()).collect();
        order.sort_by(|&i, &j| {
            self.runs[j]
                .val_loss
                .total_cmp(&self.runs[i].val_loss)
                .then(i.cmp(&j))
        });
        let mut drop = vec![false; self.runs.len()];
        for &i in &order[..k] {
            drop[i] = true;
        }
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for (run, d) in self.runs.iter().zip(drop) {
            if d {
                dropped.push(run.clone());
            } else {
                kept.push(run.clone());
            }
        }
        Ok((
            RunsTable {
                runs: kept,
                source: self.source.clone(),
                data_unit: self.data_unit.clone(),
            },
            dropped,
        ))
    }
}

fn detect_format(text: &str, path: &Path) -> TableFormat {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("jsonl") || ext.eq_ignore_ascii_case("json") {
        return TableFormat::Jsonl;
    }
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if first.trim_start().starts_with('{') {
        return TableFormat::Jsonl;
    }
    if first.contains("Model Size") && first.contains("Training FLOP") {
        return TableFormat::Chinchilla;
    }
    TableFormat::Csv
}

/// A CSV header: column name → index.
struct Header {
    names: Vec<String>,
}

impl Header {
    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

fn csv_records(text: &str, path: &Path) -> Result<(Header, Vec<(u64, csv::StringRecord)>)> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: 1,
            message: format!("bad header: {e}"),
        })?
        .iter()
        .map(str::to_string)
        .collect();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line: e.position().map_or(0, |p| p.line()),
            message: e.to_string(),
        })?;
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(str::is_empty) {
            continue;
        }
        rows.push((line, record));
    }
    Ok((Header { names: header }, rows))
}

fn parse_number(path: &Path, line: u64, column: &str, text: &str) -> Result<f64> {
    if text.is_empty() {
        return Err(Error::InvalidValue {
            path: path.to_path_buf(),
            line,
            column: column.to_string(),
            message: "missing value".into(),
        });
    }
    text.parse::<f64>().map_err(|_| Error::InvalidValue {
        path: path.to_path_buf(),
        line,
        column: column.to_string(),
        message: format!("`{text}` is not a number"),
    })
}

fn require(header: &Header, path: &Path, column: &str) -> Result<usize> {
    header.index(column).ok_or_else(|| Error::MissingColumn {
        path: path.to_path_buf(),
        line: 1,
        column: column.to_string(),
    })
}

fn parse_native_csv(text: &str, path: &Path) -> Result<Vec<Run>> {
    use columns as c;
    let (header, rows) = csv_records(text, path)?;
    let model = require(&header, path, c::MODEL)?;
    let params = require(&header, path, c::PARAMS)?;
    let structures = require(&header, path, c::TRAIN_STRUCTURES)?;
    let flops = require(&header, path, c::FLOPS)?;
    let loss = require(&header, path, c::VAL_LOSS)?;
    let optional = |name: &str| header.index(name);
    let atoms = optional(c::TRAIN_ATOMS);
    let energy = optional(c::VAL_ENERGY);
    let force = optional(c::VAL_FORCE);
    let stress = optional(c::VAL_STRESS);
    let k = optional(c::FLOPS_PER_PARAM_SAMPLE);
    let mut runs = Vec::with_capacity(rows.len());
    for (line, rec) in rows {
        let field = |i: usize| rec.get(i).unwrap_or("");
        let num = |i: usize, name: &str| parse_number(path, line, name, field(i));
        let opt = |i: Option<usize>, name: &str| i.map(|i| num(i, name)).transpose();
        let mut run = Run::new(
            field(model),
            num(params, c::PARAMS)?,
            num(structures, c::TRAIN_STRUCTURES)?,
            num(flops, c::FLOPS)?,
            num(loss, c::VAL_LOSS)?,
        );
        run.line = line;
        if run.model.is_empty() {
            return Err(Error::InvalidValue {
                path: path.to_path_buf(),
                line,
                column: c::MODEL.into(),
                message: "missing value".into(),
            });
        }
        run.train_atoms = opt(atoms, c::TRAIN_ATOMS)?;
        run.val_energy = opt(energy, c::VAL_ENERGY)?;
        run.val_force = opt(force, c::VAL_FORCE)?;
        run.val_stress = opt(stress, c::VAL_STRESS)?;
        run.flops_per_param_sample = opt(k, c::FLOPS_PER_PARAM_SAMPLE)?;
        for (i, name) in header.names.iter().enumerate() {
            if !c::ALL.contains(&name.as_str()) {
                run.extra.insert(name.clone(), field(i).to_string());
            }
        }
        runs.push(run);
    }
    Ok(runs)
}

fn parse_chinchilla(text: &str, path: &Path) -> Result<Vec<Run>> {
    let (header, rows) = csv_records(text, path)?;
    let n = require(&header, path, "Model Size")?;
    let c = require(&header, path, "Training FLOP")?;
    let l = require(&header, path, "loss")?;
    let mut runs = Vec::with_capacity(rows.len());
    for (line, rec) in rows {
        let field = |i: usize| rec.get(i).unwrap_or("");
        let params = parse_number(path, line, "Model Size", field(n))?;
        let flops = parse_number(path, line, "Training FLOP", field(c))?;
        let loss = parse_number(path, line, "loss", field(l))?;
        let mut run = Run::new("chinchilla", params, flops / (6.0 * params), flops, loss);
        run.line = line;
        run.flops_per_param_sample = Some(6.0);
        for (i, name) in header.names.iter().enumerate() {
            if i != n && i != c && i != l {
                run.extra.insert(name.clone(), field(i).to_string());
            }
        }
        // Validate the source columns by their own names before the derived D.
        for (column, v) in [
            ("Model Size", params),
            ("Training FLOP", flops),
            ("loss", loss),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return Err(Error::InvalidValue {
                    path: path.to_path_buf(),
                    line,
                    column: column.into(),
                    message: format!("{v} is not a finite positive number"),
                });
            }
        }
        runs.push(run);
    }
    Ok(runs)
}

fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Run>> {
    use columns as c;
    let mut runs = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(trimmed).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            line,
            message: format!("bad JSON: {e}"),
        })?;
        let serde_json::Value::Object(map) = value else {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line,
                message: "each line must be a JSON object".into(),
            });
        };
        let missing = |column: &str| Error::MissingColumn {
            path: path.to_path_buf(),
            line,
            column: column.to_string(),
        };
        let invalid = |column: &str, message: String| Error::InvalidValue {
            path: path.to_path_buf(),
            line,
            column: column.to_string(),
            message,
        };
        let num = |column: &str| -> Result<Option<f64>> {
            match map.get(column) {
                None => Ok(None),
                Some(serde_json::Value::Number(n)) => n
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| invalid(column, format!("{n} is not representable as f64"))),
                Some(serde_json::Value::Null) => {
                    Err(invalid(column, "missing value (null)".into()))
                }
                Some(serde_json::Value::String(s)) => parse_number(path, line, column, s).map(Some),
                Some(other) => Err(invalid(column, format!("`{other}` is not a number"))),
            }
        };
        let req = |column: &str| num(column)?.ok_or_else(|| missing(column));
        let model = match map.get(c::MODEL) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => return Err(invalid(c::MODEL, format!("`{other}` is not a string"))),
            None => return Err(missing(c::MODEL)),
        };
        let mut run = Run::new(
            &model,
            req(c::PARAMS)?,
            req(c::TRAIN_STRUCTURES)?,
            req(c::FLOPS)?,
            req(c::VAL_LOSS)?,
        );
        run.line = line;
        run.train_atoms = num(c::TRAIN_ATOMS)?;
        run.val_energy = num(c::VAL_ENERGY)?;
        run.val_force = num(c::VAL_FORCE)?;
        run.val_stress = num(c::VAL_STRESS)?;
        run.flops_per_param_sample = num(c::FLOPS_PER_PARAM_SAMPLE)?;
        for (key, value) in &map {
            if !c::ALL.contains(&key.as_str()) {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                run.extra.insert(key.clone(), text);
            }
        }
        runs.push(run);
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "model,params,train_structures,train_atoms,flops,val_loss,val_energy,val_force,val_stress,flops_per_param_sample,seed,precision\n";

    #[test]
    fn reads_native_csv_with_extra_keys() {
        let text = format!(
            "{HEADER}schnet,1000,10,100,6e4,2.5,0.5,1.5,0.5,6,1,f32\nschnet,2000,20,200,2.4e5,2.0,0.4,1.2,0.4,6,2,bf16\n"
        );
        let t = RunsTable::parse(&text, Path::new("runs.csv"), None).unwrap();
        assert_eq!(t.len(), 2);
        let r = &t.runs()[1];
        assert_eq!(r.line, 3);
        assert_eq!(r.params, 2000.0);
        assert_eq!(r.train_atoms, Some(200.0));
        assert_eq!(r.extra["precision"], "bf16");
        assert_eq!(r.k(), 6.0);
    }

    #[test]
    fn rejects_bad_rows_naming_line_and_column() {
        for (bad_row, column) in [
            (
                "schnet,1000,10,100,6e4,-2.5,0.5,1.5,0.5,6,1,f32",
                "val_loss",
            ),
            ("schnet,0,10,100,6e4,2.5,0.5,1.5,0.5,6,1,f32", "params"),
            (
                "schnet,1000,,100,6e4,2.5,0.5,1.5,0.5,6,1,f32",
                "train_structures",
            ),
            ("schnet,1000,10,100,inf,2.5,0.5,1.5,0.5,6,1,f32", "flops"),
            ("schnet,1000,10,100,6e4,NaN,0.5,1.5,0.5,6,1,f32", "val_loss"),
            (
                "schnet,1000,10,100,6e4,2.5,0.5,-1.5,0.5,6,1,f32",
                "val_force",
            ),
            (
                "schnet,1000,10,abc,6e4,2.5,0.5,1.5,0.5,6,1,f32",
                "train_atoms",
            ),
        ] {
            let text =
                format!("{HEADER}schnet,1000,10,100,6e4,2.5,0.5,1.5,0.5,6,1,f32\n{bad_row}\n");
            let err = RunsTable::parse(&text, Path::new("runs.csv"), None).unwrap_err();
            match &err {
                Error::InvalidValue {
                    line, column: c, ..
                } => {
                    assert_eq!(*line, 3, "{err}");
                    assert_eq!(c, column, "{err}");
                }
                other => panic!("unexpected error {other}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains("runs.csv, line 3") && msg.contains(column),
                "{msg}"
            );
        }
    }

    #[test]
    fn missing_column_is_named() {
        let err = RunsTable::parse(
            "model,params,flops,val_loss\nx,1,2,3\n",
            Path::new("r.csv"),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("train_structures"), "{err}");
    }

    #[test]
    fn reads_jsonl_and_rejects_null() {
        let text = r#"{"model":"fcn","params":10,"train_structures":5,"flops":300,"val_loss":1.5,"seed":7}
{"model":"fcn","params":20,"train_structures":5,"flops":600,"val_loss":1.2,"precision":"f32"}
"#;
        let t = RunsTable::parse(text, Path::new("runs.jsonl"), None).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.runs()[0].extra["seed"], "7");
        let bad = text.replace("\"flops\":600", "\"flops\":null");
        let err = RunsTable::parse(&bad, Path::new("runs.jsonl"), None).unwrap_err();
        assert!(
            matches!(err, Error::InvalidValue { line: 2, ref column, .. } if column == "flops"),
            "{err}"
        );
    }

    #[test]
    fn chinchilla_import_derives_tokens() {
        let text = "x,y,Model Size,Training FLOP,loss\n1,2,1e9,6e19,2.5\n";
        let t = RunsTable::parse(text, Path::new("c.csv"), None).unwrap();
        let r = &t.runs()[0];
        assert!((r.train_structures - 1e10).abs() < 1.0);
        assert_eq!(r.k(), 6.0);
        let bad = "x,y,Model Size,Training FLOP,loss\n1,2,1e9,6e19,0\n";
        let err = RunsTable::parse(bad, Path::new("c.csv"), None).unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("loss"),
            "{err}"
        );
    }

    #[test]
    fn excludes_highest_losses() {
        let runs = (0..6)
            .map(|i| {
                Run::new(
                    "m",
                    1.0 + i as f64,
                    1.0,
                    1.0,
                    [3.0, 5.0, 1.0, 4.0, 2.0, 0.5][i],
                )
            })
            .collect();
        let t = RunsTable::new(runs).unwrap();
        let (kept, dropped) = t.exclude_top_loss(2).unwrap();
        assert_eq!(kept.len(), 4);
        let d: Vec<f64> = dropped.iter().map(|r| r.val_loss).collect();
        assert_eq!(d, vec![5.0, 4.0]);
        assert!(t.exclude_top_loss(6).is_err());
    }
}
