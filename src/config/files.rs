//! Reading the files a config names (the config itself, certificates, keys, CA bundles,
//! the admin tokens file): regular files only, and only up to a size.
//!
//! A path may point at `/dev/zero`, a FIFO or a directory; reading those would never end
//! or never make sense. `check` and `serve` read through this one function, so whatever
//! `check` accepts `serve` can read.

use std::io::Read;
use std::path::Path;

/// The largest PEM file (certificate chain, key, CA bundle) or tokens file read, in bytes.
pub const MAX_SMALL_FILE_BYTES: u64 = 1024 * 1024;

/// The file's bytes, when it is a regular file of at most `max` bytes. Errors are
/// `io::Error`s whose text says what was wrong (`InvalidInput` for a non-regular or
/// oversized file).
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > max {
        return Err(too_large(max));
    }
    // The file may grow between the check and the read.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(max));
    }
    Ok(bytes)
}

/// Like [`read_bounded`], for text.
pub fn read_bounded_text(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// The entries of an admin tokens file: YAML lines `NAME: sha256:HEX` (64 hex digits, the
/// SHA-256 of the token). The error says which entry is wrong and how.
pub fn parse_tokens(text: &str) -> Result<Vec<(String, [u8; 32])>, String> {
    let map: std::collections::BTreeMap<String, String> = serde_yaml::from_str(text)
        .map_err(|e| format!("expected `name: sha256:HEX` lines: {e}"))?;
    map.into_iter()
        .map(|(name, value)| {
            let hex_digest = value.strip_prefix("sha256:").ok_or_else(|| {
                format!("`{name}`: the value must look like `sha256:` and 64 hex digits")
            })?;
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hex_digest, &mut hash)
                .map_err(|_| format!("`{name}`: `{hex_digest}` is not 64 hex digits"))?;
            Ok((name, hash))
        })
        .collect()
}

fn too_large(max: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("larger than {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_large_files_are_refused() {
        let e = read_bounded(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        assert!(read_bounded(dir.path(), 1024).is_err());
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'x'; 2048]).unwrap();
        let e = read_bounded(&path, 1024).unwrap_err();
        assert!(e.to_string().contains("larger than 1024 bytes"), "{e}");
        assert_eq!(read_bounded(&path, 2048).unwrap().len(), 2048);
    }
}
