//! The library's modules import one another in one direction only: `scripts/module_cycles.py`
//! finds every cycle between modules (a module naming another that names it back, directly or
//! through others) and this test fails on any. Skipped with a note where no `python3` runs.

use std::process::Command;

#[test]
fn no_import_cycles_between_modules() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/module_cycles.py");
    let out = match Command::new("python3").arg(script).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: python3 did not start ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "import cycles:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("no import cycles among "), "{text}");
}
