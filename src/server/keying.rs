//! The keying files: each interval's tag dialects and mapping rules kept
//! by digest, so that a replay after a crash makes the keys the live run
//! made, even when the configuration changed in between (a reload, then a
//! crash; or a new file at the restart).
//!
//! The contract, in order:
//!
//! 1. Before any interval is opened under a keying (at the start, and at
//!    a reload that changes it), its file is written and synced:
//!    `data_dir/keying/<digest, 16 hex digits>.toml`, the canonical TOML of
//!    [`KeyingSettings`] (format 1: `format`, `tag_dialects`,
//!    `[[mapping]]`). A reload whose file cannot be written keeps the
//!    keying in force (logged).
//! 2. Each interval's start record in the WAL names its keying's digest
//!    (see [`crate::wal::format::Kind::Start`]); 0 is no dialect and no rule.
//! 3. A replay applies each interval's records under the keying its start
//!    record names. A file that is missing or does not compile is counted
//!    (`tallyd_keying_missing_total`), a damaged one moved aside, and the
//!    interval is replayed under the keying in force.
//!
//! The newest [`KEEP`] files are kept: a WAL holds intervals of a few
//! keyings at most.

use std::io;
use std::path::{Path, PathBuf};

use crate::aggregate::mapping::{Keying, KeyingSettings};
use crate::fs::Fs;

/// Keying files kept.
pub const KEEP: usize = 32;

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keying")
}

fn file(data_dir: &Path, digest: u64) -> PathBuf {
    dir(data_dir).join(format!("{digest:016x}.toml"))
}

/// Writes `keying`'s file (step 1) unless it is there, and prunes the
/// oldest past [`KEEP`]. Blocking I/O.
pub fn save(fs: &dyn Fs, data_dir: &Path, keying: &Keying) -> io::Result<()> {
    if keying.digest == 0 {
        return Ok(());
    }
    let path = file(data_dir, keying.digest);
    if path.exists() {
        // In use again: the newest, so that pruning keeps it.
        return std::fs::File::options()
            .write(true)
            .open(&path)?
            .set_modified(std::time::SystemTime::now());
    }
    std::fs::create_dir_all(dir(data_dir))?;
    fs.write_atomic(&path, keying.text.as_bytes())?;
    prune(fs, &dir(data_dir));
    Ok(())
}

fn prune(fs: &dyn Fs, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(KEEP);
    for (_, path) in files.into_iter().take(excess) {
        let _ = fs.remove(&path);
    }
}

/// The keying of `digest` (step 3): `Ok(None)` when no file holds it;
/// `Err` says why a file could not be used (a damaged one is moved
/// aside). Blocking I/O.
pub fn load(fs: &dyn Fs, data_dir: &Path, digest: u64) -> Result<Option<Keying>, String> {
    if digest == 0 {
        return Ok(Some(Keying::default()));
    }
    let path = file(data_dir, digest);
    let bytes = match crate::fs::read_optional(&path) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let keying = std::str::from_utf8(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str::<KeyingSettings>(t).map_err(|e| e.to_string()))
        .and_then(|s| Keying::compile(&s).map_err(|(f, why)| format!("{f}: {why}")))
        .and_then(|k| {
            (k.digest == digest)
                .then_some(k)
                .ok_or_else(|| "its digest is not its name".to_owned())
        });
    keying.map(Some).map_err(|why| {
        let moved = crate::fs::quarantine(fs, &path).map_or_else(
            |e| format!("not moved: {e}"),
            |to| format!("moved to {}", to.display()),
        );
        format!("{}: {why} ({moved})", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::mapping::RuleSettings;
    use crate::fs::RealFs;

    fn keying(glob: &str) -> Keying {
        Keying::compile(&KeyingSettings {
            format: 0,
            tag_dialects: vec!["influxdb".into()],
            mapping: vec![RuleSettings {
                glob: glob.into(),
                prefix: "p.".into(),
                ..RuleSettings::default()
            }],
        })
        .expect("compiles")
    }

    #[test]
    fn a_saved_keying_loads_back_by_its_digest() {
        let d = crate::test_dir::test_dir("keying");
        let k = keying("a.*");
        save(&RealFs, &d, &k).expect("save");
        let back = load(&RealFs, &d, k.digest).expect("loads").expect("there");
        assert_eq!((back.digest, &back.text), (k.digest, &k.text));
        assert_eq!(load(&RealFs, &d, keying("b.*").digest), Ok(None));
        let none = load(&RealFs, &d, 0).expect("no keying").expect("default");
        assert!(none.rules.is_empty() && none.dialects.is_empty());
    }

    #[test]
    fn a_damaged_keying_file_is_moved_aside_and_said_so() {
        let d = crate::test_dir::test_dir("keying");
        let k = keying("a.*");
        save(&RealFs, &d, &k).expect("save");
        std::fs::write(file(&d, k.digest), "format = 1\n[[mapping]]\nregex = '('\n")
            .expect("damage");
        let e = load(&RealFs, &d, k.digest).expect_err("damaged");
        assert!(e.contains("moved to"), "{e}");
        assert_eq!(load(&RealFs, &d, k.digest), Ok(None), "moved aside");
    }
}
