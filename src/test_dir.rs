//! Unit-test directories: each is made fresh under the system temp dir and
//! removed when its guard drops (also when the test panics), so test runs do
//! not fill the disk with WAL segments.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// A directory removed on drop; derefs to its path.
pub(crate) struct TestDir(PathBuf);

/// A fresh, empty directory `tallyd-{tag}-{pid}-{n}` under the temp dir.
pub(crate) fn test_dir(tag: &str) -> TestDir {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tallyd-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    TestDir(dir)
}

impl Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
