//! Container logs on the node: one file per run of a container, the two newest kept, served
//! to `kubectl logs` through the link (tail, limit, previous, follow).

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_api::link::LogRequest;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// The log file of run `run` of `container` in the pod with `uid`.
pub fn file(dir: &Path, uid: &str, container: &str, run: u32) -> PathBuf {
    dir.join("pods")
        .join(uid)
        .join("logs")
        .join(container)
        .join(format!("{run}.log"))
}

/// Make room for run `run`: its directory exists, runs older than the previous are gone.
pub fn prepare(dir: &Path, uid: &str, container: &str, run: u32) -> std::io::Result<PathBuf> {
    let f = file(dir, uid, container, run);
    if let Some(parent) = f.parent() {
        std::fs::create_dir_all(parent)?;
        for entry in std::fs::read_dir(parent)?.flatten() {
            let n = entry.file_name();
            let keep = n
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|r| r + 1 >= run);
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    // A run number can repeat after the agent restarts from its cache; start clean.
    let _ = std::fs::remove_file(&f);
    Ok(f)
}

/// The last `n` lines of `data`.
pub fn tail(data: &[u8], n: u64) -> &[u8] {
    if n == 0 {
        return &data[data.len()..];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

/// Write what `req` asks of the log file `path` to `out`. With `follow`, keep writing what is
/// appended until `running` says the run has ended (and the file is drained) or `out` fails.
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
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut data = Vec::new();
    f.read_to_end(&mut data).await?;
    let first = match req.tail_lines {
        Some(n) => tail(&data, n),
        None => &data,
    };
    let n = (first.len() as u64).min(budget) as usize;
    out.write_all(&first[..n]).await?;
    out.flush().await?;
    budget -= n as u64;
    if !req.follow {
        return Ok(());
    }
    let mut pos = data.len() as u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if budget == 0 {
            return Ok(());
        }
        let alive = running();
        f.seek(std::io::SeekFrom::Start(pos)).await?;
        let got = f.read(&mut buf).await?;
        if got > 0 {
            let n = (got as u64).min(budget) as usize;
            out.write_all(&buf[..n]).await?;
            out.flush().await?;
            budget -= n as u64;
            pos += got as u64;
            continue;
        }
        if !alive {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_whole_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\n", 0), b"");
    }

    #[test]
    fn keeps_the_current_and_previous_run() {
        let d = tempfile::tempdir().unwrap();
        for run in 0..4 {
            let f = prepare(d.path(), "u", "c", run).unwrap();
            std::fs::write(&f, format!("run {run}\n")).unwrap();
        }
        let parent = file(d.path(), "u", "c", 0).parent().unwrap().to_path_buf();
        let mut left: Vec<String> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["2.log", "3.log"]);
    }
}
