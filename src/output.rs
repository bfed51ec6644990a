//! Output files written as a database writes its files.
//!
//! - [`check_outputs`] refuses, before any work starts, an output whose directory is missing
//!   or unwritable, a special file (`/dev/null`, a pipe, a directory), a path given to two
//!   roles, and an output that is also an input.
//! - [`OutputLock`] is an advisory lock (`.NAME.fm-lock` beside the file, `flock`-style via
//!   `File::try_lock`): a second writer to the same output gets [`Error::Locked`] at once.
//!   Taking it also removes temporary files that killed runs left for that output.
//! - [`stage`] writes into a temporary file created exclusively in the target's directory
//!   (`.NAME.XXXXXXXX.fm-tmp`, never following a planted link) and fsyncs it; [`commit`]
//!   renames every staged file into place and fsyncs the directories, so a command writes
//!   all its outputs or none, and a crash leaves either the old file or the new one.
//! - [`Transaction`] makes that hold across every writer a command calls: while one is open on
//!   a thread, [`commit`] (and so every `save`, plot and `.npy` writer) only stages, and
//!   [`Transaction::commit`] renames everything at the end.
//! - Names near `NAME_MAX` (255 bytes) get temporary and lock names shortened with a hash of the
//!   full name, so any name the file system takes can be written.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::describe::file_kind;
use crate::error::{Error, Result};

/// The suffix of temporary files (`.NAME.XXXXXXXX.fm-tmp`).
pub const TEMP_SUFFIX: &str = ".fm-tmp";
/// The suffix of lock files (`.NAME.fm-lock`).
pub const LOCK_SUFFIX: &str = ".fm-lock";
/// Random characters in a temporary name: fixed, so stale-file clean-up of `a` never matches
/// the temporaries of `a.b`.
const RAND_CHARS: usize = 8;
/// The longest file name most file systems take (Linux's `NAME_MAX`), in bytes.
const NAME_MAX: usize = 255;
/// Bytes a temporary name adds to the output's name: `.`, `.`, the random part, the suffix.
const TEMP_EXTRA: usize = 2 + RAND_CHARS + TEMP_SUFFIX.len();

/// The name temporary and lock names are built from: the output's own name, or, when that
/// name leaves no room for [`TEMP_EXTRA`] bytes under [`NAME_MAX`], its start and a hash of the
/// whole name (FNV-1a, stable across runs so a later run finds a killed run's temporaries).
fn stem_of(name: &OsStr) -> std::ffi::OsString {
    let bytes = name.as_encoded_bytes();
    if bytes.len() + TEMP_EXTRA <= NAME_MAX {
        return name.to_os_string();
    }
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    // Room for `~`, 16 hex digits and the temporary name's extra bytes.
    let keep = NAME_MAX - TEMP_EXTRA - 17;
    let text = name.to_string_lossy();
    let mut cut = keep.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash:016x}", &text[..cut]).into()
}

/// The directory a path's file lives in (`.` for a bare name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn path_err(role: &str, path: &Path, reason: impl Into<String>) -> Error {
    Error::OutputPath {
        role: role.to_string(),
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn name_of<'a>(role: &str, path: &'a Path) -> Result<&'a OsStr> {
    match path.file_name() {
        Some(n) if !path.as_os_str().to_string_lossy().ends_with('/') => Ok(n),
        _ => Err(path_err(
            role,
            path,
            "not a file name (a directory or `..`); expected a path to a file",
        )),
    }
}

/// What makes two paths the same file: the canonical path, and on Unix the device and inode.
#[derive(Debug, PartialEq)]
struct Identity {
    canonical: PathBuf,
    inode: Option<(u64, u64)>,
}

impl Identity {
    fn of(path: &Path) -> Option<Self> {
        let meta = fs::metadata(path).ok();
        let canonical = match &meta {
            Some(_) => fs::canonicalize(path).ok()?,
            None => fs::canonicalize(dir_of(path)).ok()?.join(path.file_name()?),
        };
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            meta.map(|m| (m.dev(), m.ino()))
        };
        #[cfg(not(unix))]
        let inode = None;
        Some(Identity { canonical, inode })
    }

    fn same(&self, other: &Identity) -> bool {
        self.canonical == other.canonical || (self.inode.is_some() && self.inode == other.inode)
    }
}

/// Checks every output before work starts; `outputs` and `inputs` are `(role, path)` pairs
/// such as `("--out", path)` and `("--model", path)` (inputs that do not exist are skipped).
///
/// Refused, with the role and the reason: a missing or unwritable directory, an existing
/// path that is not a regular file (a directory, `/dev/null`, a pipe), two roles sharing one
/// file, an output that is an input. Nothing is created except a probe file that is removed.
///
/// ```
/// use std::path::Path;
/// let dir = std::env::temp_dir();
/// let out = dir.join(format!("fm-check-doc-{}.npy", std::process::id()));
/// flow_matching::output::check_outputs(&[("--out", &out)], &[]).unwrap();
/// let e = flow_matching::output::check_outputs(&[("--out", &out), ("--trajectory", &out)], &[])
///     .unwrap_err();
/// assert!(e.to_string().contains("--trajectory"), "{e}");
/// let e = flow_matching::output::check_outputs(&[("--out", Path::new("/dev/null"))], &[]);
/// assert!(e.unwrap_err().to_string().contains("regular file"));
/// ```
pub fn check_outputs(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    let mut seen: Vec<(&str, &Path, Identity)> = Vec::new();
    for &(role, path) in outputs {
        let name = name_of(role, path)?;
        let dir = dir_of(path);
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(path_err(
                    role,
                    path,
                    format!("{} is {}, not a directory", dir.display(), file_kind(&m)),
                ))
            }
            Err(e) => {
                return Err(path_err(
                    role,
                    path,
                    format!("directory {} does not exist ({e})", dir.display()),
                ))
            }
        }
        match fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                return Err(path_err(
                    role,
                    path,
                    format!("is {}; only regular files are replaced", file_kind(&m)),
                ))
            }
            _ => {}
        }
        // The only reliable writability test is to create a file; the probe is removed.
        temp_file_in(dir, name).map_err(|e| {
            path_err(
                role,
                path,
                format!("cannot create files in directory {} ({e})", dir.display()),
            )
        })?;
        let id = Identity::of(path)
            .ok_or_else(|| path_err(role, path, "cannot resolve the path to a canonical name"))?;
        for &(other_role, other_path) in inputs {
            if Identity::of(other_path).is_some_and(|o| o.same(&id)) {
                return Err(path_err(
                    role,
                    path,
                    format!(
                        "is also the input {other_role} ({}); writing it would destroy the input",
                        other_path.display()
                    ),
                ));
            }
        }
        if let Some((other_role, other_path, _)) = seen.iter().find(|(_, _, o)| o.same(&id)) {
            return Err(path_err(
                role,
                path,
                format!(
                    "is also the output {other_role} ({}); give each output its own file",
                    other_path.display()
                ),
            ));
        }
        seen.push((role, path, id));
    }
    Ok(())
}

/// [`check_outputs`], then an [`OutputLock`] on every output, held until the returned locks
/// are dropped: what a command calls first, before it reads or computes anything large.
pub fn prepare_outputs(
    outputs: &[(&str, &Path)],
    inputs: &[(&str, &Path)],
) -> Result<Vec<OutputLock>> {
    check_outputs(outputs, inputs)?;
    outputs
        .iter()
        .map(|(_, p)| OutputLock::acquire(p))
        .collect()
}

/// Creates `.NAME.XXXXXXXX.fm-tmp` in `dir` exclusively (`O_EXCL`: a planted file or link
/// of that name makes it pick another name, never follow it).
fn temp_file_in(dir: &Path, name: &OsStr) -> std::io::Result<tempfile::NamedTempFile> {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(stem_of(name));
    prefix.push(".");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(TEMP_SUFFIX).rand_bytes(RAND_CHARS);
    // An output is an ordinary file: 0666 less the umask, as `File::create` would give
    // (tempfile's default, 0600, would hide a model from the user's other accounts).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(fs::Permissions::from_mode(0o666));
    }
    b.tempfile_in(dir)
}

/// Whether `entry` is a temporary file of the output named `name` (see [`TEMP_SUFFIX`]).
fn is_temp_of(entry: &OsStr, name: &OsStr) -> bool {
    let stem = stem_of(name);
    let (Some(entry), Some(name)) = (entry.to_str(), stem.to_str()) else {
        return false;
    };
    let Some(rest) = entry
        .strip_prefix('.')
        .and_then(|r| r.strip_prefix(name))
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    rest.len() == RAND_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Removes the temporary files a killed writer left for `name` in `dir`; returns how many.
/// Only called with the output's lock held, so no live writer owns them.
fn clean_stale_temps(dir: &Path, name: &OsStr) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| is_temp_of(&e.file_name(), name))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

/// Locks held by this process: (lock file, holders, the locked file).
static HELD: Mutex<Vec<(PathBuf, usize, File)>> = Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<(PathBuf, usize, File)>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// An advisory lock on one output path, released (and its lock file removed) when the last
/// holder in this process drops it. Re-entrant within a process: the trainer and the
/// checkpoint writer it calls share one lock; another process gets [`Error::Locked`].
#[derive(Debug)]
pub struct OutputLock {
    lock_path: PathBuf,
}

impl OutputLock {
    /// Takes the lock of `path` (`.NAME.fm-lock` in its directory) without waiting, and removes
    /// stale temporary files of `path` left by killed runs.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let out = dir.path().join("model.safetensors");
    /// let lock = flow_matching::output::OutputLock::acquire(&out).unwrap();
    /// assert!(dir.path().join(".model.safetensors.fm-lock").exists());
    /// drop(lock);
    /// assert!(!dir.path().join(".model.safetensors.fm-lock").exists());
    /// ```
    pub fn acquire(path: &Path) -> Result<Self> {
        let name = name_of("output", path)?;
        let dir = fs::canonicalize(dir_of(path)).map_err(|e| {
            path_err(
                "output",
                path,
                format!("directory {} does not exist ({e})", dir_of(path).display()),
            )
        })?;
        let mut lock_name = std::ffi::OsString::from(".");
        lock_name.push(stem_of(name));
        lock_name.push(LOCK_SUFFIX);
        let lock_path = dir.join(lock_name);
        let mut held = held();
        if let Some(entry) = held.iter_mut().find(|e| e.0 == lock_path) {
            entry.1 += 1;
            return Ok(OutputLock { lock_path });
        }
        let file = lock_file(path, &lock_path)?;
        held.push((lock_path.clone(), 1, file));
        drop(held);
        clean_stale_temps(&dir, name);
        Ok(OutputLock { lock_path })
    }
}

/// Opens and locks the lock file, retrying when another process removed it between our open
/// and our lock (we must hold a lock on the file that is at the path).
fn lock_file(path: &Path, lock_path: &Path) -> Result<File> {
    for _ in 0..8 {
        if let Ok(m) = fs::symlink_metadata(lock_path) {
            if !m.is_file() {
                return Err(path_err(
                    "output",
                    path,
                    format!(
                        "its lock {} is {}, not a regular file",
                        lock_path.display(),
                        file_kind(&m)
                    ),
                ));
            }
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(lock_path)
            .map_err(|e| Error::io(lock_path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    path: path.to_path_buf(),
                    lock: lock_path.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(lock_path, e)),
        }
        if same_file(&file, lock_path) {
            return Ok(file);
        }
    }
    Err(Error::Locked {
        path: path.to_path_buf(),
        lock: lock_path.to_path_buf(),
    })
}

/// Whether the open `file` is the regular file now at `path` (not a link, not replaced).
fn same_file(file: &File, path: &Path) -> bool {
    let (Ok(a), Ok(b)) = (file.metadata(), fs::symlink_metadata(path)) else {
        return false;
    };
    if !b.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }
    #[cfg(not(unix))]
    {
        a.len() == b.len()
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let mut held = held();
        if let Some(i) = held.iter().position(|e| e.0 == self.lock_path) {
            held[i].1 -= 1;
            if held[i].1 == 0 {
                // Remove while still locked, then unlock by closing: see `lock_file`.
                let (p, _, file) = held.swap_remove(i);
                let _ = fs::remove_file(&p);
                drop(file);
            }
        }
    }
}

/// An output written to its temporary file and fsynced, waiting for [`commit`]; dropping it
/// removes the temporary file and leaves the target untouched.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    tmp: tempfile::TempPath,
    _lock: OutputLock,
}

impl Staged {
    /// The target path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file's path (removed on drop, renamed by [`commit`]).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }
}

/// Writes an output through `write` into an exclusively created temporary file beside
/// `path` (under the output's lock) and fsyncs it; nothing is renamed until [`commit`].
pub fn stage(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<Staged> {
    let lock = OutputLock::acquire(path)?;
    let name = name_of("output", path)?;
    if let Ok(m) = fs::metadata(path) {
        if !m.is_file() {
            return Err(path_err(
                "output",
                path,
                format!("is {}; only regular files are replaced", file_kind(&m)),
            ));
        }
    }
    let dir = dir_of(path);
    let mut tmp = temp_file_in(dir, name).map_err(|e| Error::io(path, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        write(&mut w)?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    Ok(Staged {
        path: path.to_path_buf(),
        tmp: tmp.into_temp_path(),
        _lock: lock,
    })
}

/// [`stage`] for bytes already in memory.
pub fn stage_bytes(path: &Path, bytes: &[u8]) -> Result<Staged> {
    stage(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

thread_local! {
    /// The outputs staged under this thread's open [`Transaction`] (`None`: none is open).
    static PENDING: RefCell<Option<Vec<Staged>>> = const { RefCell::new(None) };
}

/// Renames every staged file into place, then fsyncs their directories. All writing happened
/// in [`stage`], so only a failing rename (a full disk cannot cause one) can stop it part way.
///
/// While a [`Transaction`] is open on this thread, the files are kept staged instead, to be
/// renamed with every other output of the command by [`Transaction::commit`].
pub fn commit(staged: Vec<Staged>) -> Result<()> {
    let deferred = PENDING.with(|p| match p.borrow_mut().as_mut() {
        Some(pending) => {
            for s in staged {
                // A later write of the same output replaces the earlier one (its temporary
                // file is removed when the earlier `Staged` drops).
                pending.retain(|o| o.path != s.path);
                pending.push(s);
            }
            None
        }
        None => Some(staged),
    });
    match deferred {
        Some(staged) => rename_all(staged),
        None => Ok(()),
    }
}

fn rename_all(staged: Vec<Staged>) -> Result<()> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for s in staged {
        let Staged { path, tmp, _lock } = s;
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        let d = dir_of(&path).to_path_buf();
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs.iter().try_for_each(|d| sync_dir(d))
}

/// All or nothing across every output a command writes: while it is open on this thread,
/// [`commit`] only stages, so a command that fails half way (a full disk under its second
/// output, a diverged run) leaves every earlier file as it was. Dropping it without
/// [`Transaction::commit`] removes the staged temporaries.
///
/// ```
/// use flow_matching::output::Transaction;
/// let dir = tempfile::tempdir().unwrap();
/// let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
/// let tx = Transaction::begin().unwrap();
/// flow_matching::io::atomic_write(&a, b"a").unwrap();
/// assert!(!a.exists(), "staged, not renamed");
/// flow_matching::io::atomic_write(&b, b"b").unwrap();
/// assert_eq!(tx.commit().unwrap(), vec![a.clone(), b.clone()]);
/// assert!(a.exists() && b.exists());
/// ```
#[derive(Debug)]
pub struct Transaction {
    /// Tied to the thread whose writers it collects.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Transaction {
    /// Opens the transaction of this thread; an error when one is already open.
    pub fn begin() -> Result<Self> {
        PENDING.with(|p| {
            let mut p = p.borrow_mut();
            if p.is_some() {
                return Err(Error::invalid(
                    "output transaction",
                    "a second one",
                    "one open transaction per thread",
                ));
            }
            *p = Some(Vec::new());
            Ok(Transaction {
                _thread: std::marker::PhantomData,
            })
        })
    }

    /// Renames everything staged so far into place (the transaction stays open for later
    /// writes) and returns the paths written, in the order they were staged.
    pub fn commit(&self) -> Result<Vec<PathBuf>> {
        commit_open()
    }
}

/// [`Transaction::commit`] for this thread's open transaction, wherever it was begun (nothing
/// to do when none is open): a command that reports after its files calls it first.
pub fn commit_open() -> Result<Vec<PathBuf>> {
    let staged = PENDING.with(|p| p.borrow_mut().as_mut().map(std::mem::take));
    let staged = staged.unwrap_or_default();
    let paths = staged.iter().map(|s| s.path.clone()).collect();
    rename_all(staged)?;
    Ok(paths)
}

impl Drop for Transaction {
    fn drop(&mut self) {
        // Unrenamed outputs are discarded: their temporaries go, their targets stay as they were.
        let staged = PENDING.with(|p| p.borrow_mut().take());
        drop(staged);
    }
}

/// Runs `write` with this thread's [`Transaction`] (if any) set aside, so what it commits is
/// renamed at once: a training run's periodic checkpoints must survive a kill before the end.
pub fn immediately<T>(write: impl FnOnce() -> Result<T>) -> Result<T> {
    let saved = PENDING.with(|p| p.borrow_mut().take());
    let r = write();
    PENDING.with(|p| *p.borrow_mut() = saved);
    r
}

/// Makes a rename in `dir` durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(dir, e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_match_only_their_output() {
        let a = OsStr::new("a");
        assert!(is_temp_of(OsStr::new(".a.AbCd1234.fm-tmp"), a));
        assert!(!is_temp_of(OsStr::new(".a.b.AbCd1234.fm-tmp"), a));
        assert!(!is_temp_of(OsStr::new(".a.AbCd123.fm-tmp"), a));
        assert!(!is_temp_of(OsStr::new("a.AbCd1234.fm-tmp"), a));
        assert!(is_temp_of(
            OsStr::new(".a.b.AbCd1234.fm-tmp"),
            OsStr::new("a.b")
        ));
    }

    #[test]
    fn staged_outputs_appear_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
        std::fs::write(&a, b"old").unwrap();
        let sa = stage_bytes(&a, b"new a").unwrap();
        let sb = stage_bytes(&b, b"new b").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"old");
        assert!(!b.exists());
        commit(vec![sa, sb]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
            let plain = dir.path().join("plain");
            File::create(&plain).unwrap();
            assert_eq!(mode(&b), mode(&plain), "an output gets File::create's mode");
            std::fs::remove_file(&plain).unwrap();
        }
        assert_eq!(std::fs::read(&a).unwrap(), b"new a");
        assert_eq!(std::fs::read(&b).unwrap(), b"new b");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary or lock file left: {names:?}");
    }

    #[test]
    fn dropped_stage_leaves_target_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        std::fs::write(&a, b"old").unwrap();
        drop(stage_bytes(&a, b"new").unwrap());
        assert_eq!(std::fs::read(&a).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temps_are_removed_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        let stale = dir.path().join(".a.bin.Zz9Zz9Zz.fm-tmp");
        let other = dir.path().join(".a.bin.x.Zz9Zz9Zz.fm-tmp");
        std::fs::write(&stale, b"half").unwrap();
        std::fs::write(&other, b"keep").unwrap();
        commit(vec![stage_bytes(&a, b"x").unwrap()]).unwrap();
        assert!(!stale.exists());
        assert!(other.exists(), "another output's temporary file is kept");
    }

    #[test]
    fn planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let a = dir.path().join("a.bin");
        // The lock's name planted as a link to the victim is refused, not followed.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&victim, dir.path().join(".a.bin.fm-lock")).unwrap();
            let e = stage_bytes(&a, b"x").unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{e}");
            std::fs::remove_file(dir.path().join(".a.bin.fm-lock")).unwrap();
        }
        commit(vec![stage_bytes(&a, b"x").unwrap()]).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn checks_name_roles_and_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        let missing = dir.path().join("nope").join("a.bin");
        let e = check_outputs(&[("--out", &missing)], &[]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::write(&a, b"data").unwrap();
        let e = check_outputs(&[("--out", &a)], &[("--data", &a)]).unwrap_err();
        assert!(e.to_string().contains("input --data"), "{e}");
        let via_dotdot = dir.path().join("x").join("..").join("a.bin");
        std::fs::create_dir(dir.path().join("x")).unwrap();
        let e = check_outputs(&[("--out", &a), ("--loss-plot", &via_dotdot)], &[]).unwrap_err();
        assert!(e.to_string().contains("also the output --out"), "{e}");
        let e = check_outputs(&[("--out", dir.path())], &[]).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn lock_is_reentrant_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        let l1 = OutputLock::acquire(&a).unwrap();
        let l2 = OutputLock::acquire(&a).unwrap();
        drop(l1);
        assert!(dir.path().join(".a.bin.fm-lock").exists());
        drop(l2);
        assert!(!dir.path().join(".a.bin.fm-lock").exists());
    }
}
