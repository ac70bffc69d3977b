//! Extended XYZ (the libAtoms/ASE text format): streaming reader and atomic writer.
//!
//! A frame is a line with the atom count, a comment line of `key=value` pairs and one line per
//! atom whose columns are described by `Properties=name:type:count:...` (types `S` string,
//! `I` integer, `R` real, `L` logical; default `species:S:1:pos:R:3`).
//!
//! # Comment line rules
//! - Values are bare tokens, `"quoted strings"` (backslash escapes `\"`, `\\`, `\n`),
//!   `{old style}` or `[new, style]` arrays (nested brackets are flattened); bare keys mean `T`.
//! - A value whose whitespace/comma separated tokens are all integers becomes an integer (array),
//!   else all reals a real (array), else all of `T F True False true false TRUE FALSE` a boolean
//!   (array), else a string. Old-style quoted arrays with one element become scalars; `[...]`
//!   arrays always stay arrays.
//! - `Lattice` holds 9 numbers, the lattice vectors one after another (the rows of
//!   [`Structure::cell`]). With a `Lattice` and no `pbc` the structure is periodic on all axes;
//!   without a `Lattice` the cell is zero and not periodic.
//! - Labels and their aliases, first match wins: energy `energy`, `REF_energy`, `free_energy`;
//!   forces column `forces`, `force`, `REF_forces` (`R:3`); stress `stress`, `REF_stress` as 6
//!   Voigt values (xx, yy, zz, yz, xz, xy) or 9 values (column-major, as ASE reads them: equal
//!   to row-major for the symmetric stress), else `virial` (6 or 9 values, eV) with
//!   σ = −virial / V. Stress units are eV/Å^3, ASE sign. The key that provided a label is
//!   consumed; every other key goes to [`Structure::info`] and every extra column to
//!   [`Structure::arrays`], and both are written back.
//!
//! # Writer
//! [`Writer`] writes every float as the shortest string that parses back to the same `f64`, so
//! files round-trip bit for bit through matscale and through `ase.io.read`. It writes into a
//! temporary file next to the target and renames it on [`Writer::finish`].

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::elements;
use crate::io::{temp_path, Location, ReadError, WriteError};
use crate::structure::{voigt_to_matrix, Mat3};
use crate::{InfoValue, PerAtomArray, PerAtomData, Structure};

/// Bytes read from the source per refill.
const BLOCK: usize = 4 << 20;
/// The parallel reader parses frames in batches of about this many bytes.
const BATCH_BYTES: usize = 8 << 20;

/// Opens an extxyz file for streaming (sequential parsing; see [`Reader::parallel`]).
pub fn read_path(path: &Path) -> Result<Reader<File>, ReadError> {
    let file = File::open(path).map_err(|e| ReadError::io(path, e))?;
    Ok(Reader::new(file, path))
}

/// Reads every frame of an extxyz file into memory.
pub fn read_all(path: &Path) -> Result<Vec<Structure>, ReadError> {
    read_path(path)?.collect()
}

/// Parses extxyz text held in memory; `path` is only used in error messages.
pub fn parse_str(text: &str, path: &Path) -> Result<Vec<Structure>, ReadError> {
    Reader::new(text.as_bytes(), path).collect()
}

/// Where one frame lies in its batch's block of bytes.
#[derive(Debug, Clone, Copy)]
struct Span {
    /// Frame index, 0-based.
    index: usize,
    /// Line number of the comment line, 1-based.
    comment_line: usize,
    /// The atom count.
    natoms: usize,
    /// Byte range of the comment line and the atom lines in the block.
    start: usize,
    end: usize,
}

/// Frames split off the input, not parsed yet: they own their bytes, so the next batch can be
/// read while this one is parsed.
struct Batch {
    block: Vec<u8>,
    spans: Vec<Span>,
    /// An error found while splitting, after the frames of `spans`.
    error: Option<ReadError>,
}

/// What the splitter found at the current position.
enum Split {
    Frame(Span),
    /// More input is needed to complete the next frame.
    NeedMore,
    /// Clean end of input.
    End,
}

/// Reads blocks of input and splits them into frames by counting lines.
struct Splitter<R> {
    src: R,
    path: PathBuf,
    /// Unsplit input is `buf[pos..filled]`.
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    eof: bool,
    /// Lines before `pos`.
    line: usize,
    /// Frames split off so far.
    frames: usize,
    /// The end of the input or an error was reached.
    done: bool,
    /// Bytes read per refill.
    block: usize,
}

impl<R: Read> Splitter<R> {
    fn location(&self, line: usize) -> Location {
        Location::file(&self.path)
            .with_frame(self.frames)
            .with_line(line)
    }

    /// Moves the unsplit input to the front and reads more (at least doubling the room when the
    /// buffer holds one incomplete frame, so a huge frame costs amortised linear time).
    fn refill(&mut self) -> Result<(), ReadError> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.filled, 0);
            self.filled -= self.pos;
            self.pos = 0;
        }
        let want = self.filled + self.block.max(self.filled);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        while self.filled < self.buf.len() {
            match self.src.read(&mut self.buf[self.filled..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::io(&self.path, e)),
            }
        }
        Ok(())
    }

    /// Finds the next frame in `buf[pos..filled]` without consuming it.
    fn split(&self) -> Result<Split, ReadError> {
        let data = &self.buf[self.pos..self.filled];
        let mut at = 0usize;
        let mut line = self.line;
        // The atom-count line; blank lines between frames and at the end are skipped.
        let natoms = loop {
            if at >= data.len() {
                return Ok(if self.eof {
                    Split::End
                } else {
                    Split::NeedMore
                });
            }
            let (line_end, next) = match memchr::memchr(b'\n', &data[at..]) {
                Some(i) => (at + i, at + i + 1),
                None if self.eof => (data.len(), data.len()),
                None => return Ok(Split::NeedMore),
            };
            line += 1;
            let trimmed = data[at..line_end].trim_ascii();
            at = next;
            if trimmed.is_empty() {
                continue;
            }
            // ASE accepts extra tokens after the count; take the first one.
            let first = trimmed
                .split(|b| b.is_ascii_whitespace())
                .next()
                .unwrap_or(trimmed);
            match std::str::from_utf8(first)
                .ok()
                .and_then(|t| t.parse::<usize>().ok())
            {
                Some(n) => break n,
                None => {
                    return Err(ReadError::parse(
                        self.location(line),
                        format!(
                            "expected the number of atoms, found {:?}",
                            String::from_utf8_lossy(&trimmed[..trimmed.len().min(80)])
                        ),
                    ))
                }
            }
        };
        let start = at;
        let comment_line = line + 1;
        // The comment line and `natoms` atom lines.
        let mut found = 0usize;
        let mut end = at;
        for i in memchr::memchr_iter(b'\n', &data[at..]) {
            found += 1;
            end = at + i + 1;
            if found > natoms {
                break;
            }
        }
        if found <= natoms {
            if !self.eof {
                return Ok(Split::NeedMore);
            }
            // A last line without its newline still counts.
            if end < data.len() {
                found += 1;
                end = data.len();
            }
            if found <= natoms {
                let what = if found == 0 {
                    "the comment line is missing".to_string()
                } else {
                    format!(
                        "truncated frame: expected {natoms} atom lines, found {}",
                        found - 1
                    )
                };
                return Err(ReadError::parse(self.location(comment_line + found), what));
            }
        }
        Ok(Split::Frame(Span {
            index: self.frames,
            comment_line,
            natoms,
            start: self.pos + start,
            end: self.pos + end,
        }))
    }

    /// Splits off the next batch of about `max_bytes` of frames (at least one frame).
    fn next_batch(&mut self, max_bytes: usize) -> Batch {
        let mut spans: Vec<Span> = Vec::new();
        let mut bytes = 0usize;
        let mut error = None;
        while !self.done && bytes < max_bytes {
            match self.split() {
                Ok(Split::Frame(span)) => {
                    bytes += span.end - span.start;
                    self.line = span.comment_line + span.natoms;
                    self.pos = span.end;
                    self.frames += 1;
                    spans.push(span);
                }
                Ok(Split::End) => self.done = true,
                // Parse what we have before the buffer moves.
                Ok(Split::NeedMore) if !spans.is_empty() => break,
                Ok(Split::NeedMore) => {
                    if let Err(e) = self.refill() {
                        error = Some(e);
                        self.done = true;
                    }
                }
                Err(e) => {
                    error = Some(e);
                    self.done = true;
                }
            }
        }
        // Hand the block over and keep only the unsplit tail.
        let tail = self.buf[self.pos..self.filled].to_vec();
        self.filled = tail.len();
        self.pos = 0;
        let block = std::mem::replace(&mut self.buf, tail);
        Batch {
            block,
            spans,
            error,
        }
    }
}

/// A streaming extxyz reader: an iterator over the frames of any [`Read`] (it buffers itself;
/// no `BufReader` needed).
///
/// It reads blocks of a few MB and splits them into frames by counting lines. With
/// [`Reader::parallel`] on, it parses a batch of frames on the rayon pool while the next batch is
/// read and split, and yields frames in file order. Parallel parsing is off by default: on the
/// shared 2-core machines this project runs on, rayon's workers compete with other processes
/// and the parallel path measured slower than the sequential one (docs/BENCHMARKS.md); turn it
/// on for idle multi-core machines. Memory stays bounded by two batches (or one frame, if a
/// frame is larger). After an error the iterator ends.
pub struct Reader<R> {
    splitter: Splitter<R>,
    path: PathBuf,
    batch_bytes: usize,
    parallel: bool,
    ready: VecDeque<Result<Structure, ReadError>>,
    /// The batch split off while the previous one was parsed.
    next: Option<Batch>,
    done: bool,
}

impl<R: Read + Send> Reader<R> {
    /// A reader over `src`; `path` names the source in error messages.
    pub fn new(src: R, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            splitter: Splitter {
                src,
                path: path.clone(),
                buf: Vec::new(),
                pos: 0,
                filled: 0,
                eof: false,
                line: 0,
                frames: 0,
                done: false,
                block: BLOCK,
            },
            path,
            batch_bytes: BATCH_BYTES,
            parallel: false,
            ready: VecDeque::new(),
            next: None,
            done: false,
        }
    }

    /// Turns parallel parsing on or off (off by default; the order of frames is the same either
    /// way).
    pub fn parallel(mut self, parallel: bool) -> Self {
        self.parallel = parallel;
        self
    }

    /// Sets the bytes read per refill and the bytes of frames parsed per batch (tuning and tests;
    /// both at least 1).
    pub fn buffer_sizes(mut self, block: usize, batch: usize) -> Self {
        self.splitter.block = block.max(1);
        self.batch_bytes = batch.max(1);
        self
    }

    /// Fills `self.ready` with the next batch of parsed frames.
    fn fill(&mut self) {
        let batch = match self.next.take() {
            Some(b) => b,
            None => self.splitter.next_batch(self.batch_bytes),
        };
        let (path, batch_bytes) = (&self.path, self.batch_bytes);
        let parse_all = |b: &Batch, parallel: bool| -> Vec<Result<Structure, ReadError>> {
            let parse = |sp: &Span| parse_frame(&b.block[sp.start..sp.end], sp, path);
            if parallel && b.spans.len() > 1 {
                b.spans.par_iter().map(parse).collect()
            } else {
                b.spans.iter().map(parse).collect()
            }
        };
        let parsed = if self.parallel && !self.splitter.done {
            let splitter = &mut self.splitter;
            let (parsed, next) = rayon::join(
                || parse_all(&batch, true),
                || splitter.next_batch(batch_bytes),
            );
            self.next = Some(next);
            parsed
        } else {
            parse_all(&batch, self.parallel)
        };
        self.ready.extend(parsed);
        if let Some(e) = batch.error {
            self.ready.push_back(Err(e));
        }
        if self.splitter.done
            && self
                .next
                .as_ref()
                .is_none_or(|b| b.spans.is_empty() && b.error.is_none())
        {
            self.done = true;
        }
    }
}

impl<R: Read + Send> Iterator for Reader<R> {
    type Item = Result<Structure, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ready.is_empty() && !self.done {
            self.fill();
        }
        let item = self.ready.pop_front()?;
        if item.is_err() {
            // Stop after the first error: the frames after it cannot be trusted.
            self.ready.clear();
            self.next = None;
            self.done = true;
        }
        Some(item)
    }
}

// ---------------------------------------------------------------------------------------------
// Comment line

/// How a value was written on the comment line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delim {
    Bare,
    Quoted,
    Braces,
    Brackets,
}

/// `(key, value and its delimiter)` pairs of a comment line; bare keys have no value.
type CommentPairs = Vec<(String, Option<(String, Delim)>)>;

/// Splits a comment line into `(key, value, delimiter)` triples; bare keys get `None`.
fn tokenize_comment(line: &str) -> Result<CommentPairs, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        let key = if c == '"' {
            chars.next();
            read_quoted(&mut chars).ok_or("unterminated quoted key")?
        } else {
            let mut k = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '=' {
                    break;
                }
                k.push(c);
                chars.next();
            }
            k
        };
        // `key = value` is allowed (whitespace around '=').
        let mut look = chars.clone();
        while look.peek().is_some_and(|c| c.is_whitespace()) {
            look.next();
        }
        if look.peek() != Some(&'=') {
            if key.is_empty() {
                return Err("a value without a key".into());
            }
            out.push((key, None));
            continue;
        }
        chars = look;
        chars.next(); // '='
        if key.is_empty() {
            return Err("`=` without a key".into());
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let value = match chars.peek() {
            Some('"') => {
                chars.next();
                let v = read_quoted(&mut chars)
                    .ok_or_else(|| format!("unterminated quoted value of `{key}`"))?;
                (v, Delim::Quoted)
            }
            Some('{') => {
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => v.push(c),
                        None => return Err(format!("unterminated `{{` in the value of `{key}`")),
                    }
                }
                (v, Delim::Braces)
            }
            Some('[') => {
                let mut depth = 0usize;
                let mut v = String::new();
                let mut in_quote = false;
                loop {
                    let Some(c) = chars.next() else {
                        return Err(format!("unterminated `[` in the value of `{key}`"));
                    };
                    if in_quote {
                        if c == '\\' {
                            if let Some(e) = chars.next() {
                                v.push('\\');
                                v.push(e);
                            }
                            continue;
                        }
                        if c == '"' {
                            in_quote = false;
                        }
                        v.push(c);
                        continue;
                    }
                    match c {
                        '"' => {
                            in_quote = true;
                            v.push(c);
                        }
                        '[' => {
                            depth += 1;
                            if depth > 1 {
                                v.push(' ');
                            }
                        }
                        ']' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                            v.push(' ');
                        }
                        c => v.push(c),
                    }
                }
                (v, Delim::Brackets)
            }
            _ => {
                let mut v = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    v.push(c);
                    chars.next();
                }
                (v, Delim::Bare)
            }
        };
        out.push((key, Some(value)));
    }
    Ok(out)
}

/// Reads a quoted string after its opening quote, resolving escapes. `None` if unterminated.
fn read_quoted(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<String> {
    let mut s = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(s),
            '\\' => match chars.next()? {
                'n' => s.push('\n'),
                c => s.push(c),
            },
            c => s.push(c),
        }
    }
}

fn parse_bool(tok: &str) -> Option<bool> {
    match tok {
        "T" | "True" | "true" | "TRUE" => Some(true),
        "F" | "False" | "false" | "FALSE" => Some(false),
        _ => None,
    }
}

/// Exact powers of ten, 10^0 ..= 10^22 (all representable in f64).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Parses a real number (decimal or scientific; `inf`/`nan` too, callers check finiteness).
///
/// Fast path (Clinger): when the decimal mantissa m ≤ 2^53 and the power of ten |e| ≤ 22, both
/// are exact in f64 and m·10^e (or m/10^-e) is one correctly rounded operation, so the result is
/// the same as std's. Everything else (17-digit mantissas, large exponents, odd spellings) goes
/// to std's parser.
#[inline]
fn parse_real_bytes(t: &[u8]) -> Option<f64> {
    if let Some(x) = parse_real_fast(t) {
        return Some(x);
    }
    std::str::from_utf8(t).ok()?.parse::<f64>().ok()
}

#[inline]
fn parse_real_fast(t: &[u8]) -> Option<f64> {
    let (neg, mut i) = match t.first()? {
        b'-' => (true, 1),
        b'+' => (false, 1),
        _ => (false, 0),
    };
    let mut mantissa: u64 = 0;
    let mut digits = 0u32;
    while i < t.len() && t[i].is_ascii_digit() {
        mantissa = mantissa
            .wrapping_mul(10)
            .wrapping_add(u64::from(t[i] - b'0'));
        digits += 1;
        i += 1;
    }
    let mut frac = 0i32;
    if i < t.len() && t[i] == b'.' {
        i += 1;
        // Eight digits at a time while they last (the usual `%16.8f` fraction in one step).
        while let Some(eight) = t.get(i..i + 8).and_then(eight_digits) {
            mantissa = mantissa.wrapping_mul(100_000_000).wrapping_add(eight);
            digits += 8;
            frac += 8;
            i += 8;
        }
        while i < t.len() && t[i].is_ascii_digit() {
            mantissa = mantissa
                .wrapping_mul(10)
                .wrapping_add(u64::from(t[i] - b'0'));
            digits += 1;
            frac += 1;
            i += 1;
        }
    }
    // Up to 19 digits the mantissa cannot have wrapped.
    if digits == 0 || digits > 19 {
        return None;
    }
    let mut exp = 0i32;
    if i < t.len() && (t[i] | 0x20) == b'e' {
        i += 1;
        let eneg = match t.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        while i < t.len() && t[i].is_ascii_digit() && i - start < 4 {
            exp = exp * 10 + i32::from(t[i] - b'0');
            i += 1;
        }
        if i == start {
            return None;
        }
        if eneg {
            exp = -exp;
        }
    }
    if i != t.len() || mantissa > (1u64 << 53) {
        return None;
    }
    let e = exp - frac;
    let m = mantissa as f64;
    let x = if e == 0 {
        m
    } else if (1..=22).contains(&e) {
        m * POW10[e as usize]
    } else if (-22..0).contains(&e) {
        m / POW10[(-e) as usize]
    } else {
        return None;
    };
    Some(if neg { -x } else { x })
}

/// The value of eight ASCII digits, `None` if any byte is not a digit (SWAR: one 64-bit word).
#[inline]
fn eight_digits(b: &[u8]) -> Option<u64> {
    let word = u64::from_le_bytes(b.try_into().ok()?);
    let digits = word.wrapping_sub(0x3030_3030_3030_3030);
    // A byte is a digit iff b - '0' < 10, i.e. neither b - 0x30 nor b + 0x46 sets the top bit.
    if (digits | word.wrapping_add(0x4646_4646_4646_4646)) & 0x8080_8080_8080_8080 != 0 {
        return None;
    }
    // Pairwise combine: 8 one-digit lanes -> 4 two-digit -> 2 four-digit -> one eight-digit.
    let v = (digits.wrapping_mul(10) + (digits >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    let v = (v.wrapping_mul(10_000) + (v >> 32)) & 0x0000_0000_FFFF_FFFF;
    Some(v)
}

/// Parses a real number in a comment-line value.
#[inline]
fn parse_real(tok: &str) -> Option<f64> {
    parse_real_bytes(tok.as_bytes())
}

/// Types a comment-line value (see the module docs).
fn type_value(key: &str, raw: &str, delim: Delim) -> InfoValue {
    if key.eq_ignore_ascii_case("uid") {
        return InfoValue::Str(raw.to_string());
    }
    let tokens: Vec<&str> = raw
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .collect();
    let array = delim == Delim::Brackets || tokens.len() > 1;
    if tokens.is_empty() {
        return if delim == Delim::Brackets {
            InfoValue::FloatArray(Vec::new())
        } else {
            InfoValue::Str(raw.to_string())
        };
    }
    if let Some(v) = tokens
        .iter()
        .map(|t| t.parse::<i64>().ok())
        .collect::<Option<Vec<_>>>()
    {
        return if array {
            InfoValue::IntArray(v)
        } else {
            InfoValue::Int(v[0])
        };
    }
    if let Some(v) = tokens
        .iter()
        .map(|t| parse_real(t))
        .collect::<Option<Vec<_>>>()
    {
        return if array {
            InfoValue::FloatArray(v)
        } else {
            InfoValue::Float(v[0])
        };
    }
    if let Some(v) = tokens
        .iter()
        .map(|t| parse_bool(t))
        .collect::<Option<Vec<_>>>()
    {
        return if array {
            InfoValue::BoolArray(v)
        } else {
            InfoValue::Bool(v[0])
        };
    }
    if delim == Delim::Brackets {
        if let Some(v) = parse_string_list(raw) {
            return InfoValue::StrArray(v);
        }
    }
    InfoValue::Str(raw.to_string())
}

/// Parses `"a", "b"` (the inside of a new-style string array).
fn parse_string_list(raw: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = raw.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        match chars.next() {
            None => return Some(out),
            Some('"') => out.push(read_quoted(&mut chars)?),
            Some(_) => return None,
        }
    }
}

fn info_reals(value: &InfoValue) -> Option<Vec<f64>> {
    match value {
        InfoValue::Float(x) => Some(vec![*x]),
        InfoValue::Int(x) => Some(vec![*x as f64]),
        InfoValue::FloatArray(v) => Some(v.clone()),
        InfoValue::IntArray(v) => Some(v.iter().map(|&x| x as f64).collect()),
        _ => None,
    }
}

/// A 3x3 matrix from 9 values in column-major order (ASE's reading of `stress`/`virial`), or
/// from 6 Voigt values.
fn matrix_from_values(v: &[f64]) -> Option<Mat3> {
    match v.len() {
        6 => Some(voigt_to_matrix(&[v[0], v[1], v[2], v[3], v[4], v[5]])),
        9 => Some([[v[0], v[3], v[6]], [v[1], v[4], v[7]], [v[2], v[5], v[8]]]),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Properties and atom lines

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnType {
    Str,
    Int,
    Real,
    Bool,
}

impl ColumnType {
    fn letter(self) -> char {
        match self {
            Self::Str => 'S',
            Self::Int => 'I',
            Self::Real => 'R',
            Self::Bool => 'L',
        }
    }
}

/// Where the values of a column go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Species,
    Numbers,
    Positions,
    Forces,
    /// A column that is read but not kept (`species` when `Z` is given too).
    Skip,
    /// An extra array, by index into the frame's extra arrays.
    Extra(usize),
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: ColumnType,
    width: usize,
    target: Target,
}

const FORCE_ALIASES: [&str; 3] = ["forces", "force", "REF_forces"];
const ENERGY_ALIASES: [&str; 3] = ["energy", "REF_energy", "free_energy"];
const STRESS_ALIASES: [&str; 2] = ["stress", "REF_stress"];

fn parse_properties(spec: &str) -> Result<Vec<Column>, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    if !parts.len().is_multiple_of(3) {
        return Err(format!(
            "Properties={spec:?} must be name:type:count triples"
        ));
    }
    let mut columns: Vec<Column> = Vec::new();
    for t in parts.chunks(3) {
        let name = t[0].to_string();
        if name.is_empty() {
            return Err(format!("Properties={spec:?} has an empty column name"));
        }
        if columns.iter().any(|c| c.name == name) {
            return Err(format!("Properties={spec:?} names column `{name}` twice"));
        }
        let kind = match t[1] {
            "S" => ColumnType::Str,
            "I" => ColumnType::Int,
            "R" => ColumnType::Real,
            "L" => ColumnType::Bool,
            other => {
                return Err(format!(
                    "column `{name}` has type {other:?}; expected S, I, R or L"
                ))
            }
        };
        let width: usize = t[2].parse().ok().filter(|&w| w > 0).ok_or_else(|| {
            format!(
                "column `{name}` has count {:?}; expected a positive integer",
                t[2]
            )
        })?;
        columns.push(Column {
            name,
            kind,
            width,
            target: Target::Extra(0),
        });
    }
    // Assign targets.
    let mut extras = 0;
    let has_numbers = columns
        .iter()
        .any(|c| c.name == "Z" && c.kind == ColumnType::Int && c.width == 1);
    let forces_col = FORCE_ALIASES.iter().find_map(|alias| {
        columns
            .iter()
            .position(|c| c.name == *alias && c.kind == ColumnType::Real && c.width == 3)
    });
    for (i, c) in columns.iter_mut().enumerate() {
        let (kind, width) = (c.kind, c.width);
        let require = |k: ColumnType, w: usize| {
            if (kind, width) == (k, w) {
                Ok(())
            } else {
                Err(format!(
                    "column `{}` must be {}:{w}, found {}:{width}",
                    c.name,
                    k.letter(),
                    kind.letter()
                ))
            }
        };
        c.target = match c.name.as_str() {
            "species" if has_numbers => Target::Skip,
            "species" => {
                require(ColumnType::Str, 1)?;
                Target::Species
            }
            "Z" => {
                require(ColumnType::Int, 1)?;
                Target::Numbers
            }
            "pos" => {
                require(ColumnType::Real, 3)?;
                Target::Positions
            }
            _ if Some(i) == forces_col => Target::Forces,
            _ => {
                extras += 1;
                Target::Extra(extras - 1)
            }
        };
    }
    if !columns.iter().any(|c| c.target == Target::Positions) {
        return Err(format!("Properties={spec:?} has no `pos:R:3` column"));
    }
    if !columns
        .iter()
        .any(|c| matches!(c.target, Target::Species | Target::Numbers))
    {
        return Err(format!(
            "Properties={spec:?} has neither `species:S:1` nor `Z:I:1`"
        ));
    }
    Ok(columns)
}

/// A small symbol → atomic number cache (a frame has few distinct species).
#[derive(Default)]
struct SpeciesCache<'a> {
    seen: Vec<(&'a [u8], u8)>,
}

impl<'a> SpeciesCache<'a> {
    #[inline]
    fn lookup(&mut self, symbol: &'a [u8]) -> Option<u8> {
        if let Some(&(_, z)) = self.seen.iter().find(|(s, _)| *s == symbol) {
            return Some(z);
        }
        let text = std::str::from_utf8(symbol).ok()?;
        let z = elements::atomic_number(text).or_else(|| {
            // ASE capitalises symbols ("CU" -> "Cu").
            let mut c = text.to_ascii_lowercase();
            if let Some(f) = c.get_mut(0..1) {
                f.make_ascii_uppercase();
            }
            elements::atomic_number(&c)
        })?;
        self.seen.push((symbol, z));
        Some(z)
    }
}

/// Whitespace-separated tokens of the atom lines of a frame, line by line.
struct Tokens<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Tokens<'a> {
    /// The next token of the current line, `None` at its end.
    #[inline]
    fn next_token(&mut self) -> Option<&'a [u8]> {
        let b = self.b;
        let mut i = self.i;
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\r') {
            i += 1;
        }
        if i >= b.len() || b[i] == b'\n' {
            self.i = i;
            return None;
        }
        let start = i;
        while i < b.len() && !matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        self.i = i;
        Some(&b[start..i])
    }

    /// Moves to the next line; returns how many tokens were left on the current one.
    fn end_line(&mut self) -> usize {
        let mut left = 0;
        while self.next_token().is_some() {
            left += 1;
        }
        if self.i < self.b.len() {
            self.i += 1; // the newline
        }
        left
    }
}

fn lossy(t: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(t)
}

/// Parses one frame: `text` is its comment line and atom lines.
fn parse_frame(text: &[u8], span: &Span, path: &Path) -> Result<Structure, ReadError> {
    let loc = |line: usize| Location::file(path).with_frame(span.index).with_line(line);
    let comment_line_no = span.comment_line;
    let comment_end = memchr::memchr(b'\n', text).unwrap_or(text.len());
    let comment = std::str::from_utf8(&text[..comment_end])
        .map_err(|_| ReadError::parse(loc(comment_line_no), "invalid UTF-8 in the comment line"))?
        .trim_end_matches('\r');
    let atom_text = &text[(comment_end + 1).min(text.len())..];

    // --- comment line ---
    let pairs = tokenize_comment(comment).map_err(|m| ReadError::parse(loc(comment_line_no), m))?;
    let mut info: Vec<(String, InfoValue)> = Vec::with_capacity(pairs.len());
    let mut lattice: Option<Mat3> = None;
    let mut pbc: Option<[bool; 3]> = None;
    let mut properties: Option<String> = None;
    for (key, value) in pairs {
        let cerr = |m: String| ReadError::parse(loc(comment_line_no).with_key(key.clone()), m);
        match (key.as_str(), value) {
            ("Properties", Some((v, _))) => properties = Some(v),
            ("Lattice", Some((v, d))) => {
                let vals = info_reals(&type_value(&key, &v, d))
                    .filter(|x| x.len() == 9)
                    .ok_or_else(|| cerr(format!("Lattice must be 9 numbers, found {v:?}")))?;
                if let Some(x) = vals.iter().find(|x| !x.is_finite()) {
                    return Err(cerr(format!("non-finite value {x} in Lattice")));
                }
                lattice = Some([
                    [vals[0], vals[1], vals[2]],
                    [vals[3], vals[4], vals[5]],
                    [vals[6], vals[7], vals[8]],
                ]);
            }
            ("pbc", Some((v, d))) => {
                pbc = Some(match type_value(&key, &v, d) {
                    InfoValue::Bool(b) => [b; 3],
                    InfoValue::BoolArray(b) if b.len() == 3 => [b[0], b[1], b[2]],
                    _ => return Err(cerr(format!("pbc must be 3 booleans (T/F), found {v:?}"))),
                });
            }
            (_, None) => info.push((key, InfoValue::Bool(true))),
            (_, Some((v, d))) => {
                let typed = type_value(&key, &v, d);
                info.push((key, typed));
            }
        }
    }
    if info
        .iter()
        .any(|(k, _)| k == "Properties" || k == "Lattice" || k == "pbc")
    {
        return Err(ReadError::parse(
            loc(comment_line_no),
            "`Properties`, `Lattice` and `pbc` need values",
        ));
    }
    let properties = properties.unwrap_or_else(|| "species:S:1:pos:R:3".to_string());
    let columns = parse_properties(&properties)
        .map_err(|m| ReadError::parse(loc(comment_line_no).with_key("Properties"), m))?;
    let ncols: usize = columns.iter().map(|c| c.width).sum();

    // --- atom lines ---
    let n = span.natoms;
    let mut numbers: Vec<u8> = Vec::with_capacity(n);
    let mut positions: Vec<[f64; 3]> = Vec::with_capacity(n);
    let has_forces = columns.iter().any(|c| c.target == Target::Forces);
    let mut forces: Vec<[f64; 3]> = Vec::with_capacity(if has_forces { n } else { 0 });
    let mut extras: Vec<(usize, PerAtomData)> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.target, Target::Extra(_)))
        .map(|(i, c)| {
            let cap = n.saturating_mul(c.width);
            let data = match c.kind {
                ColumnType::Str => PerAtomData::Str(Vec::with_capacity(cap)),
                ColumnType::Int => PerAtomData::Int(Vec::with_capacity(cap)),
                ColumnType::Real => PerAtomData::Real(Vec::with_capacity(cap)),
                ColumnType::Bool => PerAtomData::Bool(Vec::with_capacity(cap)),
            };
            (i, data)
        })
        .collect();
    let mut species = SpeciesCache::default();
    let mut tokens = Tokens { b: atom_text, i: 0 };
    for atom in 0..n {
        let line_no = comment_line_no + 1 + atom;
        let mut col_index = 0usize;
        let mut extra_slot = 0usize;
        for c in &columns {
            let lerr = |m: String| ReadError::parse(loc(line_no).with_key(c.name.clone()), m);
            let mut next_token = || {
                col_index += 1;
                tokens.next_token().ok_or_else(|| {
                    lerr(format!(
                        "expected {ncols} columns ({properties}), found {}",
                        col_index - 1
                    ))
                })
            };
            match c.target {
                Target::Species => {
                    let t = next_token()?;
                    let z = species
                        .lookup(t)
                        .ok_or_else(|| lerr(format!("unknown element symbol {:?}", lossy(t))))?;
                    numbers.push(z);
                }
                Target::Numbers => {
                    let t = next_token()?;
                    let z = std::str::from_utf8(t)
                        .ok()
                        .and_then(|t| t.parse::<u8>().ok())
                        .filter(|&z| elements::symbol(z).is_some())
                        .ok_or_else(|| lerr(format!("invalid atomic number {:?}", lossy(t))))?;
                    numbers.push(z);
                }
                Target::Positions | Target::Forces => {
                    let mut v = [0.0; 3];
                    for x in &mut v {
                        let t = next_token()?;
                        *x = parse_finite(t).map_err(&lerr)?;
                    }
                    if c.target == Target::Positions {
                        positions.push(v);
                    } else {
                        forces.push(v);
                    }
                }
                Target::Skip => {
                    for _ in 0..c.width {
                        next_token()?;
                    }
                }
                Target::Extra(_) => {
                    let data = &mut extras[extra_slot].1;
                    extra_slot += 1;
                    for _ in 0..c.width {
                        let t = next_token()?;
                        match data {
                            PerAtomData::Str(v) => match std::str::from_utf8(t) {
                                Ok(t) => v.push(t.to_string()),
                                Err(_) => return Err(lerr("invalid UTF-8".to_string())),
                            },
                            PerAtomData::Int(v) => v.push(
                                std::str::from_utf8(t)
                                    .ok()
                                    .and_then(|t| t.parse::<i64>().ok())
                                    .ok_or_else(|| {
                                        lerr(format!("expected an integer, found {:?}", lossy(t)))
                                    })?,
                            ),
                            PerAtomData::Real(v) => v.push(parse_finite(t).map_err(&lerr)?),
                            PerAtomData::Bool(v) => v.push(
                                std::str::from_utf8(t)
                                    .ok()
                                    .and_then(parse_bool)
                                    .ok_or_else(|| {
                                        lerr(format!(
                                            "expected a logical (T/F), found {:?}",
                                            lossy(t)
                                        ))
                                    })?,
                            ),
                        }
                    }
                }
            }
        }
        let left = tokens.end_line();
        if left > 0 {
            return Err(ReadError::parse(
                loc(line_no),
                format!(
                    "expected {ncols} columns ({properties}), found {}",
                    ncols + left
                ),
            ));
        }
    }

    // --- build the structure ---
    let has_lattice = lattice.is_some();
    let cell = lattice.unwrap_or([[0.0; 3]; 3]);
    let pbc = pbc.unwrap_or([has_lattice; 3]);
    let serr = |e| ReadError::structure(loc(comment_line_no), e);
    let mut s = Structure::new(numbers, positions, cell, pbc).map_err(serr)?;
    if columns.iter().any(|c| c.target == Target::Forces) {
        s.set_forces(forces).map_err(serr)?;
    }
    let take = |info: &mut Vec<(String, InfoValue)>, aliases: &[&str]| {
        aliases.iter().find_map(|alias| {
            info.iter()
                .position(|(k, _)| k == alias)
                .map(|i| info.remove(i))
        })
    };
    if let Some((key, value)) = take(&mut info, &ENERGY_ALIASES) {
        let e = match value {
            InfoValue::Float(x) => x,
            InfoValue::Int(x) => x as f64,
            other => {
                return Err(ReadError::parse(
                    loc(comment_line_no).with_key(key),
                    format!("energy must be a number, found {other:?}"),
                ))
            }
        };
        s.set_energy(e).map_err(serr)?;
    }
    if let Some((key, value)) = take(&mut info, &STRESS_ALIASES) {
        let m = info_reals(&value)
            .and_then(|v| matrix_from_values(&v))
            .ok_or_else(|| {
                ReadError::parse(
                    loc(comment_line_no).with_key(key.clone()),
                    format!("`{key}` must be 6 (Voigt) or 9 numbers, found {value:?}"),
                )
            })?;
        s.set_stress(m).map_err(serr)?;
    } else if let Some((key, value)) = take(&mut info, &["virial"]) {
        let m = info_reals(&value)
            .and_then(|v| matrix_from_values(&v))
            .ok_or_else(|| {
                ReadError::parse(
                    loc(comment_line_no).with_key(key.clone()),
                    format!("`virial` must be 6 (Voigt) or 9 numbers, found {value:?}"),
                )
            })?;
        s.set_stress_from_virial(m).map_err(serr)?;
    }
    for (key, value) in info {
        s.info_mut().insert(key, value);
    }
    for (i, data) in extras {
        let c = &columns[i];
        s.set_array(
            &c.name,
            PerAtomArray {
                width: c.width,
                data,
            },
        )
        .map_err(serr)?;
    }
    Ok(s)
}

#[inline]
fn parse_finite(t: &[u8]) -> Result<f64, String> {
    match parse_real_bytes(t) {
        Some(x) if x.is_finite() => Ok(x),
        Some(x) => Err(format!("non-finite value {x}")),
        None => Err(format!("expected a real number, found {:?}", lossy(t))),
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

/// Why a structure cannot be written as extxyz.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

/// Appends the shortest decimal string that parses back to exactly `x` (always with a `.` or an
/// exponent, so that readers do not take it for an integer).
pub fn push_f64(out: &mut String, x: f64) {
    let a = x.abs();
    if x == 0.0 || (1e-5..1e16).contains(&a) {
        let start = out.len();
        write!(out, "{x}").expect("writing to a String cannot fail");
        if !out[start..].contains('.') {
            out.push_str(".0");
        }
    } else {
        write!(out, "{x:e}").expect("writing to a String cannot fail");
    }
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s.starts_with(['[', '{'])
        || s.chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\\' | '=' | ','))
}

fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_bool(out: &mut String, b: bool) {
    out.push(if b { 'T' } else { 'F' });
}

fn push_value(out: &mut String, v: &InfoValue) {
    match v {
        InfoValue::Bool(b) => push_bool(out, *b),
        InfoValue::Int(i) => {
            write!(out, "{i}").expect("writing to a String cannot fail");
        }
        InfoValue::Float(x) => push_f64(out, *x),
        InfoValue::Str(s) => {
            if needs_quotes(s) {
                push_quoted(out, s);
            } else {
                out.push_str(s);
            }
        }
        InfoValue::BoolArray(v) => push_array(out, v, |o, b| push_bool(o, *b)),
        InfoValue::IntArray(v) => push_array(out, v, |o, i| {
            write!(o, "{i}").expect("writing to a String cannot fail");
        }),
        InfoValue::FloatArray(v) => push_array(out, v, |o, x| push_f64(o, *x)),
        InfoValue::StrArray(v) => {
            out.push('[');
            for (i, s) in v.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_quoted(out, s);
            }
            out.push(']');
        }
    }
}

/// Arrays of two or more values as old-style `"1 2 3"` (what ASE writes); zero or one value as
/// new-style `[1]`, which reads back as an array.
fn push_array<T>(out: &mut String, v: &[T], mut each: impl FnMut(&mut String, &T)) {
    if v.len() >= 2 {
        out.push('"');
        for (i, x) in v.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            each(out, x);
        }
        out.push('"');
    } else {
        out.push('[');
        if let Some(x) = v.first() {
            each(out, x);
        }
        out.push(']');
    }
}

fn check_key(key: &str) -> Result<(), FormatError> {
    if key.is_empty()
        || key
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '=' | '"' | ':' | '[' | '{'))
    {
        return Err(FormatError(format!(
            "key {key:?} cannot be written (empty, or holds whitespace, `=`, `\"`, `:`, `[` or `{{`)"
        )));
    }
    Ok(())
}

/// Appends one frame in extxyz to `out`.
pub fn format_frame(s: &Structure, out: &mut String) -> Result<(), FormatError> {
    const RESERVED_INFO: [&str; 3] = ["Lattice", "Properties", "pbc"];
    for key in s.info().keys() {
        check_key(key)?;
        if RESERVED_INFO.contains(&key.as_str())
            || (key == "energy" && s.energy().is_some())
            || (key == "stress" && s.stress().is_some())
        {
            return Err(FormatError(format!(
                "info key `{key}` clashes with what the writer writes itself"
            )));
        }
    }
    for (name, a) in s.arrays() {
        check_key(name)?;
        if ["species", "pos", "Z"].contains(&name.as_str())
            || (name == "forces" && s.forces().is_some())
        {
            return Err(FormatError(format!(
                "per-atom array `{name}` clashes with a standard column"
            )));
        }
        if let PerAtomData::Str(v) = &a.data {
            if let Some(bad) = v
                .iter()
                .find(|x| x.is_empty() || x.chars().any(char::is_whitespace))
            {
                return Err(FormatError(format!(
                    "per-atom string {bad:?} in `{name}` is empty or holds whitespace"
                )));
            }
        }
    }
    writeln!(out, "{}", s.len()).expect("writing to a String cannot fail");
    let cell = s.cell();
    if cell.iter().flatten().any(|&x| x != 0.0) {
        out.push_str("Lattice=\"");
        for (i, x) in cell.iter().flatten().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            push_f64(out, *x);
        }
        out.push_str("\" ");
    }
    out.push_str("Properties=species:S:1:pos:R:3");
    if s.forces().is_some() {
        out.push_str(":forces:R:3");
    }
    for (name, a) in s.arrays() {
        let letter = match a.data {
            PerAtomData::Str(_) => 'S',
            PerAtomData::Int(_) => 'I',
            PerAtomData::Real(_) => 'R',
            PerAtomData::Bool(_) => 'L',
        };
        write!(out, ":{name}:{letter}:{}", a.width).expect("writing to a String cannot fail");
    }
    if let Some(e) = s.energy() {
        out.push_str(" energy=");
        push_f64(out, e);
    }
    if let Some(m) = s.stress() {
        // Column-major, as ASE reads 9-value stresses (row-major would transpose an asymmetric
        // matrix there).
        let flat = [
            m[0][0], m[1][0], m[2][0], m[0][1], m[1][1], m[2][1], m[0][2], m[1][2], m[2][2],
        ];
        push_value(
            out_key(out, "stress"),
            &InfoValue::FloatArray(flat.to_vec()),
        );
    }
    for (key, value) in s.info() {
        push_value(out_key(out, key), value);
    }
    let p = s.pbc();
    write!(
        out,
        " pbc=\"{} {} {}\"",
        if p[0] { 'T' } else { 'F' },
        if p[1] { 'T' } else { 'F' },
        if p[2] { 'T' } else { 'F' }
    )
    .expect("writing to a String cannot fail");
    out.push('\n');
    let symbols = s.symbols();
    for i in 0..s.len() {
        write!(out, "{:<2}", symbols[i]).expect("writing to a String cannot fail");
        for x in s.positions()[i] {
            out.push(' ');
            push_f64(out, x);
        }
        if let Some(f) = s.forces() {
            for x in f[i] {
                out.push(' ');
                push_f64(out, x);
            }
        }
        for a in s.arrays().values() {
            for k in i * a.width..(i + 1) * a.width {
                out.push(' ');
                match &a.data {
                    PerAtomData::Str(v) => out.push_str(&v[k]),
                    PerAtomData::Int(v) => {
                        write!(out, "{}", v[k]).expect("writing to a String cannot fail");
                    }
                    PerAtomData::Real(v) => push_f64(out, v[k]),
                    PerAtomData::Bool(v) => push_bool(out, v[k]),
                }
            }
        }
        out.push('\n');
    }
    Ok(())
}

fn out_key<'a>(out: &'a mut String, key: &str) -> &'a mut String {
    out.push(' ');
    out.push_str(key);
    out.push('=');
    out
}

/// Formats structures as an extxyz string.
pub fn to_string<'a>(
    frames: impl IntoIterator<Item = &'a Structure>,
) -> Result<String, FormatError> {
    let mut out = String::new();
    for s in frames {
        format_frame(s, &mut out)?;
    }
    Ok(out)
}

/// Writes extxyz frames to a file atomically: into `<path>.tmp<pid>` first, renamed to `path`
/// by [`Writer::finish`]. Dropping a writer without finishing removes the temporary file.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    frames: usize,
    buf: String,
}

impl Writer {
    /// Starts writing to `path` (nothing appears at `path` until [`Writer::finish`]).
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        let tmp = temp_path(path);
        let file = File::create(&tmp).map_err(|e| WriteError::io(&tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            frames: 0,
            buf: String::new(),
        })
    }

    /// Appends one frame.
    pub fn write(&mut self, s: &Structure) -> Result<(), WriteError> {
        self.buf.clear();
        format_frame(s, &mut self.buf).map_err(|e| WriteError::Unrepresentable {
            path: self.path.clone(),
            frame: self.frames,
            message: e.0,
        })?;
        let out = self
            .out
            .as_mut()
            .expect("the output stays open until finish");
        out.write_all(self.buf.as_bytes())
            .map_err(|e| WriteError::io(&self.tmp, e))?;
        self.frames += 1;
        Ok(())
    }

    /// Number of frames written so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Flushes, syncs and moves the file into place; returns the number of frames written.
    pub fn finish(mut self) -> Result<usize, WriteError> {
        let out = self.out.take().expect("the output stays open until finish");
        let file = out
            .into_inner()
            .map_err(|e| WriteError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| WriteError::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| WriteError::io(&self.path, e))?;
        Ok(self.frames)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            // Not finished: leave no partial file behind. Nothing to do if removal fails.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads the whole of `src` as extxyz (convenience for in-memory data and tests).
pub fn read_from(src: impl Read + Send, path: &Path) -> Result<Vec<Structure>, ReadError> {
    Reader::new(src, path).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample_text(frames: usize) -> String {
        let mut out = String::new();
        for k in 0..frames {
            let n = 1 + k % 5;
            out.push_str(&format!(
                "{n}\nLattice=\"3 0 0 0 3 0 0 0 3\" Properties=species:S:1:pos:R:3:forces:R:3 energy=-{k}.5 k={k}\n"
            ));
            for i in 0..n {
                out.push_str(&format!("Cu {i}.25 0.5 -1e-3 0.1 0.2 0.3\n"));
            }
            if k % 7 == 3 {
                out.push('\n'); // blank lines between frames are skipped
            }
        }
        out
    }

    #[test]
    fn block_and_batch_sizes_do_not_change_the_result() {
        let text = sample_text(60);
        let path = Path::new("t.xyz");
        let want = parse_str(&text, path).unwrap();
        assert_eq!(want.len(), 60);
        assert_eq!(want[59].info()["k"], InfoValue::Int(59));
        for (block, batch) in [(1, 1), (7, 50), (64, 1), (100, 300), (4096, 1 << 20)] {
            for parallel in [false, true] {
                let got: Vec<Structure> = Reader::new(text.as_bytes(), path)
                    .buffer_sizes(block, batch)
                    .parallel(parallel)
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(got, want, "block {block} batch {batch} parallel {parallel}");
            }
        }
        // Errors keep their line numbers whatever the buffering, after the good frames.
        let truncated = &text[..text.len() - 10];
        for (block, batch) in [(1, 1), (13, 40), (1 << 20, 1 << 20)] {
            let results: Vec<_> = Reader::new(truncated.as_bytes(), path)
                .buffer_sizes(block, batch)
                .parallel(true)
                .collect();
            assert_eq!(results.len(), 60, "block {block}");
            assert!(results[..59].iter().all(Result::is_ok));
            let err = results[59].as_ref().unwrap_err();
            let loc = err.location().unwrap();
            assert_eq!(loc.frame, Some(59), "{err}");
            assert_eq!(loc.line, Some(text.trim_end().lines().count()), "{err}");
        }
    }

    #[test]
    fn fast_float_parsing_equals_std() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let fixed = [
            "0",
            "-0",
            "-0.0",
            "+1.5",
            ".5",
            "5.",
            "1e5",
            "1E-5",
            "2.5e+3",
            "123456789012345678",
            "9007199254740993",
            "0.1",
            "-1.55313357",
            "3.0941534745552794",
            "1e22",
            "1e23",
            "1e-22",
            "1e-23",
            "4.9e-324",
            "1.7976931348623157e308",
            "00000000000000000001.5",
            "inf",
            "-NaN",
            "1e",
            "e5",
            ".",
            "-",
            "1.2.3",
            "1e+",
            "0x10",
            "1_000",
        ];
        for t in fixed {
            let ours = parse_real_bytes(t.as_bytes());
            let std = t.parse::<f64>().ok();
            assert_eq!(
                ours.map(f64::to_bits),
                std.map(f64::to_bits),
                "{t}: {ours:?} vs {std:?}"
            );
        }
        for _ in 0..100_000 {
            let x: f64 = rng.gen_range(-1.0..1.0) * 10f64.powi(rng.gen_range(-30..30));
            for t in [
                format!("{x}"),
                format!("{x:.8}"),
                format!("{x:16.8}").trim().to_string(),
                format!("{x:e}"),
                format!("{x:.3e}"),
            ] {
                let ours = parse_real_bytes(t.as_bytes()).map(f64::to_bits);
                assert_eq!(ours, t.parse::<f64>().ok().map(f64::to_bits), "{t}");
            }
        }
    }
}
