//! Format-independent reading and writing of structures, dispatching on the file extension.
//!
//! | extension            | format                                   | read | write |
//! |----------------------|------------------------------------------|------|-------|
//! | `.xyz`, `.extxyz`    | extended XYZ ([`crate::extxyz`])         | yes  | yes   |
//! | `.json`              | pymatgen Structure JSON ([`crate::pymatgen`]) | yes | no |
//! | `.aselmdb`, `.lmdb`  | ASE LMDB database ([`crate::aselmdb`])   | yes  | yes   |
//!
//! Every reader streams: [`read_frames`] returns an iterator that holds at most a bounded number
//! of frames in memory, so files larger than memory can be processed frame by frame. Every error
//! says where it happened ([`Location`]: file, frame, line or database key).
//!
//! ```no_run
//! use matscale_structures::io;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! for frame in io::read_frames("train.extxyz".as_ref())? {
//!     let s = frame?;
//!     println!("{} atoms, energy {:?} eV", s.len(), s.energy());
//! }
//! # Ok(()) }
//! ```

use std::borrow::Borrow;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Structure, StructureError};

/// Where in an input file something went wrong: the file, and where known the frame (0-based),
/// the line (1-based) and the database key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// The frame (structure) index, 0-based.
    pub frame: Option<usize>,
    /// The line number in a text file, 1-based.
    pub line: Option<usize>,
    /// The key of a database row (ASE LMDB) or of a JSON field.
    pub key: Option<String>,
}

impl Location {
    /// A location naming only the file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    /// Sets the frame index.
    pub fn with_frame(mut self, frame: usize) -> Self {
        self.frame = Some(frame);
        self
    }

    /// Sets the (1-based) line number.
    pub fn with_line(mut self, line: usize) -> Self {
        self.line = Some(line);
        self
    }

    /// Sets the key (database key or field name).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(frame) = self.frame {
            write!(f, ", frame {frame}")?;
        }
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key {key:?}")?;
        }
        Ok(())
    }
}

/// An error while reading structures from a file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file extension names no format matscale reads.
    #[error("{}: unknown file format (expected .xyz, .extxyz, .json, .aselmdb or .lmdb)", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// The content does not follow the format.
    #[error("{location}: {message}")]
    Parse {
        /// Where.
        location: Box<Location>,
        /// What is wrong, naming the field and value.
        message: String,
    },
    /// The content parsed but describes an invalid structure (NaN, unknown element, ...).
    #[error("{location}: invalid structure: {source}")]
    Structure {
        /// Where.
        location: Box<Location>,
        /// What is invalid.
        source: StructureError,
    },
}

impl ReadError {
    /// A parse error at `location`.
    pub fn parse(location: Location, message: impl Into<String>) -> Self {
        Self::Parse {
            location: Box::new(location),
            message: message.into(),
        }
    }

    /// An invalid-structure error at `location`.
    pub fn structure(location: Location, source: StructureError) -> Self {
        Self::Structure {
            location: Box::new(location),
            source,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Where the error happened, if it is tied to a place in the file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Parse { location, .. } | Self::Structure { location, .. } => Some(location),
            Self::Io { .. } | Self::UnknownFormat { .. } => None,
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. } | Self::UnknownFormat { path } => path,
            Self::Parse { location, .. } | Self::Structure { location, .. } => &location.path,
        }
    }
}

/// An error while writing structures to a file.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The file could not be created, written or renamed into place.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file extension names no format matscale writes.
    #[error("{}: cannot write this format (expected .xyz, .extxyz, .aselmdb or .lmdb)", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A structure holds something the format cannot represent.
    #[error("{}, frame {frame}: {message}", path.display())]
    Unrepresentable {
        /// The file.
        path: PathBuf,
        /// The frame index, 0-based.
        frame: usize,
        /// What cannot be written and why.
        message: String,
    },
    /// The database backend failed.
    #[error("{}: database error: {message}", path.display())]
    Database {
        /// The file.
        path: PathBuf,
        /// The backend's message.
        message: String,
    },
}

impl WriteError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// The file formats matscale knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Extended XYZ (`.xyz`, `.extxyz`).
    ExtXyz,
    /// pymatgen Structure JSON (`.json`): mlearn rows, MPtrj / Alexandria entries or plain dicts.
    PymatgenJson,
    /// ASE LMDB database (`.aselmdb`, `.lmdb`), the OMat24 format.
    AseLmdb,
}

impl Format {
    /// The format named by the extension of `path` (case-insensitive), if any.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "xyz" | "extxyz" => Some(Self::ExtXyz),
            "json" => Some(Self::PymatgenJson),
            "aselmdb" | "lmdb" => Some(Self::AseLmdb),
            _ => None,
        }
    }
}

/// A streaming iterator over the structures of a file, in file order.
pub struct Frames {
    inner: Box<dyn Iterator<Item = Result<Structure, ReadError>> + Send>,
}

impl Frames {
    /// Wraps any iterator of frames.
    pub fn new(inner: impl Iterator<Item = Result<Structure, ReadError>> + Send + 'static) -> Self {
        Self {
            inner: Box::new(inner),
        }
    }
}

impl Iterator for Frames {
    type Item = Result<Structure, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next()
    }
}

impl fmt::Debug for Frames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Frames { .. }")
    }
}

/// Opens `path` and streams its structures, choosing the format by extension (see the module
/// docs). After the first error the iterator may stop.
pub fn read_frames(path: &Path) -> Result<Frames, ReadError> {
    match Format::from_path(path) {
        Some(Format::ExtXyz) => Ok(Frames::new(crate::extxyz::read_path(path)?)),
        Some(Format::PymatgenJson) => Ok(Frames::new(crate::pymatgen::read_path(path)?)),
        Some(Format::AseLmdb) => Ok(Frames::new(crate::aselmdb::read_path(path)?)),
        None => Err(ReadError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Reads every structure of `path` into memory (see [`read_frames`]).
pub fn read_all(path: &Path) -> Result<Vec<Structure>, ReadError> {
    read_frames(path)?.collect()
}

/// Writes `frames` to `path`, choosing the format by extension (`.xyz`/`.extxyz` or
/// `.aselmdb`/`.lmdb`). The file appears only when everything was written: a run killed halfway
/// leaves no torn file. Returns the number of frames written.
///
/// Frames come as results so that a conversion can stream a reader straight into a writer;
/// the first read error stops the write (and no output file appears).
pub fn write_frames<I, S, E>(path: &Path, frames: I) -> Result<usize, WriteFramesError<E>>
where
    I: IntoIterator<Item = Result<S, E>>,
    S: Borrow<Structure>,
{
    match Format::from_path(path) {
        Some(Format::ExtXyz) => {
            let mut w = crate::extxyz::Writer::create(path)?;
            for frame in frames {
                w.write(frame.map_err(WriteFramesError::Source)?.borrow())?;
            }
            Ok(w.finish()?)
        }
        Some(Format::AseLmdb) => {
            let mut w = crate::aselmdb::Writer::create(path)?;
            for frame in frames {
                w.write(frame.map_err(WriteFramesError::Source)?.borrow())?;
            }
            Ok(w.finish()?)
        }
        _ => Err(WriteError::UnknownFormat {
            path: path.to_path_buf(),
        }
        .into()),
    }
}

/// Writes structures held in memory (see [`write_frames`]).
pub fn write_all(path: &Path, frames: &[Structure]) -> Result<usize, WriteError> {
    write_frames(path, frames.iter().map(Ok::<_, std::convert::Infallible>)).map_err(|e| match e {
        WriteFramesError::Write(e) => e,
        WriteFramesError::Source(never) => match never {},
    })
}

/// An error of [`write_frames`]: either the source of the frames failed, or the write.
#[derive(Debug, thiserror::Error)]
pub enum WriteFramesError<E> {
    /// The iterator yielding the frames returned an error (e.g. a read error while converting).
    #[error(transparent)]
    Source(E),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The temporary file next to `path` that writers fill before renaming it into place.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}
