//! Container logs on the node: one CRI log per run of a container (rotated at a bound, see
//! `outpost_wasm_runtime::log`), the two newest runs kept, served to `kubectl logs` through
//! the link (tail, limit, previous, follow, timestamps, since).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::os::unix::fs::MetadataExt;

use outpost_api::link::LogRequest;
use outpost_wasm_runtime::log;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// The log file of run `run` of `container` in the pod with `uid`: beside the pod's other
/// files rather than in directories of their own, as every directory is one more inode to
/// make and free per pod (a burst of pods spent a fifth of the agent's time in the kernel's
/// inode allocator).
pub fn file(dir: &Path, uid: &str, container: &str, run: u32) -> PathBuf {
    dir.join("pods")
        .join(uid)
        .join(format!("{container}.{run}.log"))
}

/// Make room for run `run`: its directory exists, runs older than the previous are gone,
/// and its file is a spare one from `spares` where the directory has one.
pub fn prepare(
    spares: &crate::spare::Spares,
    dir: &Path,
    uid: &str,
    container: &str,
    run: u32,
) -> std::io::Result<PathBuf> {
    let f = file(dir, uid, container, run);
    if let Some(parent) = f.parent() {
        spares.make(parent)?;
        // Runs 0 and 1 have nothing older than the previous run to remove.
        let entries = match run {
            0 | 1 => Vec::new(),
            _ => std::fs::read_dir(parent)?.flatten().collect(),
        };
        for entry in entries {
            if run_of(&entry.file_name(), container).is_some_and(|r| r + 1 < run) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    // Left over from a run that did not get to clear it (the agent died meanwhile): start
    // clean. A spare file taken replaces it.
    if !spares.take_file(&f) {
        let _ = std::fs::remove_file(&f);
    }
    let _ = std::fs::remove_file(log::rotated(&f));
    Ok(f)
}

/// The run of `container` a log file `name` belongs to: `CONTAINER.N.log` and its rotated
/// `CONTAINER.N.log.1` (container names have no dots).
fn run_of(name: &std::ffi::OsStr, container: &str) -> Option<u32> {
    name.to_str()?
        .strip_prefix(container)?
        .strip_prefix('.')?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The newest run of `container` with a log on disk, and when its log was first and last
/// written. An agent that restarts goes on from it, so restarts count across the agent's
/// own, as the kubelet's do across a reboot, and `--previous` shows the run before.
pub fn last_run(dir: &Path, uid: &str, container: &str) -> Option<(u32, SystemTime, SystemTime)> {
    let run = std::fs::read_dir(dir.join("pods").join(uid))
        .ok()?
        .flatten()
        .filter_map(|e| run_of(&e.file_name(), container))
        .max()?;
    let f = file(dir, uid, container, run);
    let m = std::fs::metadata(&f)
        .or_else(|_| std::fs::metadata(log::rotated(&f)))
        .ok()?;
    let last = m.modified().ok()?;
    Some((run, m.created().unwrap_or(last), last))
}

/// What a request shows of log records `data`: records from `cutoff` on, as the guest's
/// text, each line prefixed with its time when `timestamps`, the last `tail` lines only.
/// `fresh` says whether the next record starts a line (it carries across follow chunks).
pub fn render(
    data: &[u8],
    timestamps: bool,
    cutoff: Option<jiff::Timestamp>,
    tail: Option<u64>,
    fresh: &mut bool,
) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut cur = Vec::new();
    for r in log::records(data) {
        if cutoff.is_some_and(|c| r.at().is_some_and(|t| t < c)) {
            continue;
        }
        if *fresh && timestamps {
            cur.extend_from_slice(r.time.as_bytes());
            cur.push(b' ');
        }
        cur.extend_from_slice(r.text);
        *fresh = r.full;
        if r.full {
            cur.push(b'\n');
            lines.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    let skip = tail.map_or(0, |n| lines.len().saturating_sub(n as usize));
    lines[skip..].concat()
}

/// The end of a run's output, as a termination message under `FallbackToLogsOnError`:
/// its last 80 lines, at most the last 2048 bytes of them, as the kubelet takes it.
pub fn last_words(path: &Path) -> String {
    let mut data = std::fs::read(log::rotated(path)).unwrap_or_default();
    data.extend(std::fs::read(path).unwrap_or_default());
    let text = render(&data, false, None, Some(80), &mut true);
    let from = text.len().saturating_sub(2048);
    String::from_utf8_lossy(&text[from..]).into_owned()
}

async fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    match tokio::fs::read(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        r => r,
    }
}

/// Write what `req` asks of the log of one run (its file `path` and the rotated one beside
/// it) to `out`. With `follow`, keep writing what is appended, across rotations, until
/// `running` says the run has ended (and the file is drained) or `out` fails.
pub async fn serve<W, F>(
    path: &Path,
    req: &LogRequest,
    out: &mut W,
    running: F,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    F: Fn() -> bool,
{
    let mut budget = req.limit_bytes.unwrap_or(u64::MAX);
    let cutoff = req.since_seconds.and_then(|s| {
        jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(s as i64))
            .ok()
    });
    let mut fresh = true;
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut ino = f.metadata().await?.ino();
    let mut data = read_all(&log::rotated(path)).await?;
    let old = data.len();
    f.read_to_end(&mut data).await?;
    let mut pos = (data.len() - old) as u64;
    // A record being written as we read is finished by the follow loop.
    let whole = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut rest = data.split_off(whole);
    let first = render(&data, req.timestamps, cutoff, req.tail_lines, &mut fresh);
    if !write_some(out, &first, &mut budget).await? || !req.follow {
        return Ok(());
    }
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let alive = running();
        f.seek(std::io::SeekFrom::Start(pos)).await?;
        let got = f.read(&mut buf).await?;
        if got > 0 {
            pos += got as u64;
            rest.extend_from_slice(&buf[..got]);
            let whole = rest.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let tail = rest.split_off(whole);
            let chunk = render(&rest, req.timestamps, cutoff, None, &mut fresh);
            rest = tail;
            if !write_some(out, &chunk, &mut budget).await? {
                return Ok(());
            }
            continue;
        }
        // Drained: the file may have rotated under us, then the new one is read from its start.
        if let Ok(m) = tokio::fs::metadata(path).await {
            if m.ino() != ino {
                f = tokio::fs::File::open(path).await?;
                ino = f.metadata().await?.ino();
                pos = 0;
                continue;
            }
        }
        if !alive {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Write as much of `data` as the byte budget allows; false once the budget is spent.
async fn write_some<W: tokio::io::AsyncWrite + Unpin>(
    out: &mut W,
    data: &[u8],
    budget: &mut u64,
) -> std::io::Result<bool> {
    let n = (data.len() as u64).min(*budget) as usize;
    if n > 0 {
        out.write_all(&data[..n]).await?;
        out.flush().await?;
    }
    *budget -= n as u64;
    Ok(*budget > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(lines: &[(&str, &str, &str)]) -> Vec<u8> {
        lines
            .iter()
            .map(|(t, tag, text)| format!("{t} stdout {tag} {text}\n"))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn a_new_run_keeps_the_previous_and_other_containers_logs() {
        let dir = tempfile::tempdir().unwrap();
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(dir.path().join("pods/u"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        let spares = crate::spare::Spares::open(&dir.path().join("pods"), 4);
        for run in 0..3 {
            for c in ["app", "app2"] {
                let f = prepare(&spares, dir.path(), "u", c, run).unwrap();
                std::fs::write(&f, "x").unwrap();
                std::fs::write(log::rotated(&f), "x").unwrap();
            }
        }
        let f = prepare(&spares, dir.path(), "u", "app", 3).unwrap();
        assert_eq!(f, dir.path().join("pods/u/app.3.log"));
        assert_eq!(
            names(),
            [
                "app.2.log",
                "app.2.log.1",
                "app2.1.log",
                "app2.1.log.1",
                "app2.2.log",
                "app2.2.log.1"
            ]
        );
    }

    #[test]
    fn the_last_run_is_the_newest_log_of_that_container() {
        let dir = tempfile::tempdir().unwrap();
        assert!(last_run(dir.path(), "u", "app").is_none());
        let spares = crate::spare::Spares::open(&dir.path().join("pods"), 4);
        for (c, run) in [("app", 2), ("app", 3), ("app2", 7)] {
            let f = prepare(&spares, dir.path(), "u", c, run).unwrap();
            std::fs::write(&f, "x").unwrap();
        }
        // Only a rotated file left of the newest run still counts.
        std::fs::write(dir.path().join("pods/u/app.4.log.1"), "x").unwrap();
        assert_eq!(last_run(dir.path(), "u", "app").map(|l| l.0), Some(4));
        assert_eq!(last_run(dir.path(), "u", "app2").map(|l| l.0), Some(7));
        assert!(last_run(dir.path(), "u", "ap").is_none());
    }

    #[test]
    fn renders_tails_stamps_and_cuts_off() {
        let data = records(&[
            ("2026-01-01T00:00:01Z", "F", "a"),
            ("2026-01-01T00:00:02Z", "P", "b"),
            ("2026-01-01T00:00:03Z", "F", "c"),
            ("2026-01-01T00:00:04Z", "F", "d"),
        ]);
        let r = |ts, cutoff: Option<&str>, tail| {
            let mut fresh = true;
            let cutoff = cutoff.map(|c| c.parse().unwrap());
            String::from_utf8(render(&data, ts, cutoff, tail, &mut fresh)).unwrap()
        };
        assert_eq!(r(false, None, None), "a\nbc\nd\n");
        assert_eq!(r(false, None, Some(2)), "bc\nd\n");
        assert_eq!(r(false, None, Some(0)), "");
        assert_eq!(r(false, Some("2026-01-01T00:00:03Z"), None), "c\nd\n");
        assert_eq!(
            r(true, None, Some(2)),
            "2026-01-01T00:00:02Z bc\n2026-01-01T00:00:04Z d\n"
        );
    }
}
