//! Known data for the explorer tests, and the pages read in Debian's
//! headless Chromium.

/// `shop.orders` per region `r1`..`r8` at one interval: 80, 70, … 10.
pub const ORDERS_TOTAL: f64 = 360.0;
/// The top 3 regions, then "other" (50 + 40 + 30 + 20 + 10).
pub const TOP_AND_OTHER: [f64; 4] = [80.0, 70.0, 60.0, 150.0];

/// The lines: `shop.orders` per region and `shop.latency` 1..=100 ms, all
/// stamped `t0` (`|T`).
pub fn data(t0: u32) -> String {
    let mut text = String::new();
    for k in 1..=8u32 {
        for _ in 0..(90 - 10 * k) {
            text.push_str(&format!("shop.orders:1|c|#region:r{k}|T{t0}\n"));
        }
    }
    for v in 1..=100 {
        text.push_str(&format!("shop.latency:{v}|ms|T{t0}\n"));
    }
    text
}

/// Where screenshots go: `TALLYD_SCREENSHOTS` (scripts/screenshots.sh
/// sets it), else the test's temp dir.
pub fn shots_dir() -> std::path::PathBuf {
    match std::env::var_os("TALLYD_SCREENSHOTS") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join("tallyd-screenshots"),
    }
}

/// Saves `bytes` as `name` among the screenshots.
pub fn keep(name: &str, bytes: &[u8]) {
    let dir = shots_dir();
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(name), bytes);
}
