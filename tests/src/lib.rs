//! End-to-end tests of matscale live in `tests/tests/`; fixtures and the scripts that made them
//! live in `tests/data/`.

use std::path::PathBuf;

/// The fixture directory `tests/data` (absolute).
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// The path of one fixture file under `tests/data`.
pub fn data_file(name: &str) -> PathBuf {
    data_dir().join(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_dir_exists() {
        assert!(super::data_dir().is_dir());
    }
}
