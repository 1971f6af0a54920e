//! Known data for the explorer tests, and the pages read in Debian's
//! headless Chromium.

/// `shop.orders` per region `r1`..`r8` at one interval: 80, 70, … 10.
pub const ORDERS_TOTAL: f64 = 360.0;
/// The top 3 regions, then "other" (50 + 40 + 30 + 20 + 10).
pub const TOP_AND_OTHER: [f64; 4] = [80.0, 70.0, 60.0, 150.0];

/// `web.requests` per region `r1`..`r6` every 5 s over the 15 minutes
/// before `now`, in waves: the README's screenshot of the explorer.
pub fn waves(now: u32) -> String {
    let mut text = String::new();
    for step in 0..180u32 {
        let ts = now - 900 + step * 5;
        for r in 1..=6u32 {
            let phase = f64::from(step) / 12.0 + f64::from(r);
            let v = (f64::from(60 - 8 * r) * (1.2 + phase.sin())).round();
            text.push_str(&format!("web.requests:{v}|c|#region:r{r}|T{ts}\n"));
        }
    }
    text
}

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

/// Debian's Chromium, headless, on `url`: its DOM once the page's
/// fetches are done (`--virtual-time-budget` runs its timers and waits
/// for the network), or a screenshot of it saved as `shot`.
pub fn chromium(url: &str, shot: Option<(&str, u32)>) -> String {
    let profile = super::common::temp_dir("chromium");
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--virtual-time-budget=15000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    let path = shot.map(|(name, height)| {
        let dir = shots_dir();
        let _ = std::fs::create_dir_all(&dir);
        cmd.arg(format!("--window-size=1280,{height}"));
        cmd.arg(format!("--screenshot={}", dir.join(name).display()));
        dir.join(name)
    });
    if path.is_none() {
        cmd.arg("--dump-dom");
    }
    let out = cmd
        .arg(url)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("chromium runs (scripts/test.sh installs Debian's chromium)");
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(p) = path {
        assert!(p.exists(), "no screenshot at {}", p.display());
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `data-value` of the cell of column `column` in the first `<tr>`
/// whose start tag has every attribute of `attrs` (exact values).
pub fn cell(dom: &str, attrs: &[(&str, &str)], column: &str) -> Option<f64> {
    let mut rest = dom;
    while let Some(at) = rest.find("<tr") {
        rest = &rest[at..];
        let tag_end = rest.find('>')?;
        let tag = &rest[..tag_end];
        let row_end = rest.find("</tr>").unwrap_or(rest.len());
        if attrs
            .iter()
            .all(|(k, v)| tag.contains(&format!(" {k}=\"{v}\"")))
        {
            let row = &rest[..row_end];
            let key = format!("data-column=\"{column}\" data-value=\"");
            let at = row.find(&key)? + key.len();
            let end = row[at..].find('"')?;
            return row[at..at + end].parse().ok();
        }
        rest = &rest[tag_end..];
    }
    None
}

/// The value of attribute `attr` on the element of id `id`.
pub fn attribute<'a>(dom: &'a str, id: &str, attr: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let tag = &dom[start..start + dom[start..].find('>')?];
    let key = format!(" {attr}=\"");
    let v = tag.find(&key)? + key.len();
    Some(&tag[v..v + tag[v..].find('"')?])
}
