//! Words for values in messages: byte counts and file types. Below `error`, `limits` and
//! `output`, which all describe sizes and files, so none of them imports another for it.

use std::fs;

/// Renders a byte count for messages: `1.5 GiB (1610612736 bytes)`.
pub fn human_bytes(bytes: Option<u64>) -> String {
    let Some(b) = bytes else {
        return "more than 2^64 bytes".to_string();
    };
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} bytes");
    }
    let mut v = b as f64;
    let mut unit = "bytes";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit} ({b} bytes)")
}

/// Words for a file's type, for messages.
pub fn file_kind(meta: &fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_file() {
        return "a regular file";
    }
    if ft.is_dir() {
        return "a directory";
    }
    if ft.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_fifo() {
            return "a named pipe";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// The longest excerpt of a value an error message quotes, in characters.
pub const EXCERPT_CHARS: usize = 80;

/// At most [`EXCERPT_CHARS`] characters of `value`, with the full length when it was cut, so a
/// message about a 300 MB flag or metadata entry stays one short line.
///
/// ```
/// use flow_matching::limits::excerpt;
/// assert_eq!(excerpt("0,0.5,1"), "0,0.5,1");
/// let long = "0,".repeat(1000);
/// assert!(excerpt(&long).len() < 120 && excerpt(&long).contains("2000 characters"));
/// ```
pub fn excerpt(value: &str) -> String {
    excerpt_to(value, EXCERPT_CHARS)
}

/// At most `chars` characters of `value`, with the full length when it was cut.
pub(crate) fn excerpt_to(value: &str, chars: usize) -> String {
    let mut it = value.char_indices();
    match it.nth(chars) {
        None => value.to_string(),
        Some((cut, _)) => format!(
            "{}… ({} characters in all)",
            &value[..cut],
            value.chars().count()
        ),
    }
}

/// The longest composed text (what was checked, what was expected) an error message shows, in
/// characters: room for several flags and numbers, never a whole file's worth.
pub const TEXT_CHARS: usize = 400;

/// At most [`TEXT_CHARS`] characters of a composed message part, cut as [`excerpt`] cuts.
pub fn excerpt_text(text: &str) -> String {
    excerpt_to(text, TEXT_CHARS)
}

/// A path as an error message shows it: [`excerpt`] of its text, so a 10 KB path stays a short
/// line (the start and the length are what identify it).
///
/// ```
/// use std::path::Path;
/// use flow_matching::limits::excerpt_path;
/// assert_eq!(excerpt_path(Path::new("a/b.npy")), "a/b.npy");
/// assert!(excerpt_path(Path::new(&"d/".repeat(5000))).len() < 120);
/// ```
pub fn excerpt_path(path: &std::path::Path) -> String {
    excerpt(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_names_units() {
        assert_eq!(human_bytes(Some(10)), "10 bytes");
        assert_eq!(human_bytes(Some(3 << 30)), "3.0 GiB (3221225472 bytes)");
        assert_eq!(human_bytes(None), "more than 2^64 bytes");
    }

    #[test]
    fn file_kind_names_directories_and_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(file_kind(&fs::metadata(dir.path()).unwrap()), "a directory");
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert_eq!(file_kind(&fs::metadata(&f).unwrap()), "a regular file");
    }
}
