//! Container logs in the CRI format the kubelet writes: one record per line,
//! `<RFC 3339 time> <stdout|stderr> <F|P> <text>`, where `P` marks a write that did not end
//! its line (the text continues in the next record). A log rotates at a size bound into one
//! `.1` file beside it, so a chatty guest holds at most twice the bound on the node's flash.
//! [`Log`] is the guests' stdout and stderr; [`records`] reads a file back. A run's output
//! can also be followed live ([`Log::tap`], what `kubectl attach` reads) until the run ends
//! ([`Log::end`]).

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// Size at which a log rotates, as the kubelet's `containerLogMaxSize` default.
pub const MAX: u64 = 10 << 20;

/// Output chunks a tap holds for a slow reader; past them it misses output (the file keeps
/// it all).
const TAP_CHUNKS: usize = 256;

/// A chunk of a run's output as written: from stderr (`true`) or stdout.
pub type Chunk = (bool, Bytes);

/// One container run's log file, shared by its stdout and stderr (and, for an HTTP
/// component, by every request's instance).
pub struct Log {
    path: PathBuf,
    max: u64,
    file: Mutex<(File, u64)>,
    /// Live readers of the output; `None` once the run has ended.
    tap: Mutex<Option<tokio::sync::broadcast::Sender<Chunk>>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Log({})", self.path.display())
    }
}

/// The rotated file of `path`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl Log {
    /// Append to `path`, rotating at `max` bytes.
    pub fn open(path: &Path, max: u64) -> std::io::Result<Arc<Log>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Arc::new(Log {
            path: path.to_path_buf(),
            max: max.max(4096),
            file: Mutex::new((file, size)),
            tap: Mutex::new(Some(tokio::sync::broadcast::channel(TAP_CHUNKS).0)),
        }))
    }

    /// The run's output from now on, until it ends; `None` when it has ended already.
    pub fn tap(&self) -> Option<tokio::sync::broadcast::Receiver<Chunk>> {
        self.tap.lock().ok()?.as_ref().map(|t| t.subscribe())
    }

    /// The run has ended: taps see the end once they have read what came before it.
    pub fn end(&self) {
        if let Ok(mut t) = self.tap.lock() {
            *t = None;
        }
    }

    /// Write `bytes` from `stream` as records stamped now.
    pub fn write(&self, stream: &str, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if let Some(t) = self.tap.lock().ok().as_ref().and_then(|t| t.as_ref()) {
            if t.receiver_count() > 0 {
                let _ = t.send((stream == "stderr", Bytes::copy_from_slice(bytes)));
            }
        }
        let now = jiff::Timestamp::now();
        let mut out = Vec::with_capacity(bytes.len() + 48);
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            let (text, tag) = match line.strip_suffix(b"\n") {
                Some(t) => (t, 'F'),
                None => (line, 'P'),
            };
            write!(out, "{now} {stream} {tag} ")?;
            out.extend_from_slice(text);
            out.push(b'\n');
        }
        let mut f = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("log lock"))?;
        if f.1 > 0 && f.1 + out.len() as u64 > self.max {
            std::fs::rename(&self.path, rotated(&self.path))?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            *f = (file, 0);
        }
        f.0.write_all(&out)?;
        f.1 += out.len() as u64;
        Ok(())
    }

    /// A line from the host about this container (a failed request, say), on stderr.
    pub fn note(&self, line: &str) {
        let _ = self.write("stderr", format!("{line}\n").as_bytes());
    }

    /// The guest's stream `name` (`stdout` or `stderr`).
    pub fn stream(self: &Arc<Self>, name: &'static str) -> Stream {
        Stream {
            log: self.clone(),
            name,
        }
    }
}

/// A guest's stdout or stderr, writing into a [`Log`].
#[derive(Clone)]
pub struct Stream {
    log: Arc<Log>,
    name: &'static str,
}

impl IsTerminal for Stream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Stream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for Stream {
    async fn ready(&mut self) {}
}

impl OutputStream for Stream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.log
            .write(self.name, &bytes)
            .map_err(|e| StreamError::LastOperationFailed(wasmtime::format_err!(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.log.write(self.name, buf).map(|()| buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// One record of a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    /// The text ends its line (`F`), or continues in the next record (`P`).
    pub full: bool,
    pub text: &'a [u8],
}

impl Record<'_> {
    pub fn at(&self) -> Option<jiff::Timestamp> {
        self.time.parse().ok()
    }
}

/// The records of `data` (a log file's bytes), skipping any line that is not one.
pub fn records(data: &[u8]) -> impl Iterator<Item = Record<'_>> {
    data.split(|b| *b == b'\n').filter_map(|line| {
        let mut parts = line.splitn(4, |b| *b == b' ');
        let time = std::str::from_utf8(parts.next()?).ok()?;
        let stream = std::str::from_utf8(parts.next()?).ok()?;
        let full = match parts.next()? {
            b"F" => true,
            b"P" => false,
            _ => return None,
        };
        Some(Record {
            time,
            stream,
            full,
            text: parts.next().unwrap_or_default(),
        })
    })
}

/// The text of a log file as the guest wrote it (what `kubectl logs` shows by default).
pub fn text(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for r in records(data) {
        out.extend_from_slice(r.text);
        if r.full {
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_partial_lines_and_rotate() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0.log");
        let log = Log::open(&p, 4096).unwrap();
        log.write("stdout", b"hello\nwor").unwrap();
        log.write("stderr", b"oops\n").unwrap();
        log.write("stdout", b"ld\n").unwrap();
        let data = std::fs::read(&p).unwrap();
        let rs: Vec<Record<'_>> = records(&data).collect();
        assert_eq!(rs.len(), 4);
        assert_eq!(
            (rs[1].stream, rs[1].full, rs[1].text),
            ("stdout", false, &b"wor"[..])
        );
        assert!(rs[0].at().is_some());
        assert_eq!(text(&data), b"hello\nworoops\nld\n");
        // Past the bound the file rotates: one older file, never more.
        let line = vec![b'x'; 1000];
        for _ in 0..20 {
            log.write("stdout", &line).unwrap();
        }
        let cur = std::fs::metadata(&p).unwrap().len();
        let old = std::fs::metadata(rotated(&p)).unwrap().len();
        assert!(cur <= 4096 && old <= 4096, "{cur} {old}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_tap_sees_output_from_its_start_to_the_runs_end() {
        let d = tempfile::tempdir().unwrap();
        let log = Log::open(&d.path().join("0.log"), 4096).unwrap();
        log.write("stdout", b"before\n").unwrap();
        let mut tap = log.tap().unwrap();
        log.write("stdout", b"one\n").unwrap();
        log.write("stderr", b"two").unwrap();
        log.end();
        log.write("stdout", b"after the end\n").unwrap();
        assert_eq!(
            tap.try_recv().unwrap(),
            (false, Bytes::from_static(b"one\n"))
        );
        assert_eq!(tap.try_recv().unwrap(), (true, Bytes::from_static(b"two")));
        assert_eq!(
            tap.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Closed)
        );
        assert!(log.tap().is_none(), "no tap on an ended run");
        // The file has everything.
        let data = std::fs::read(d.path().join("0.log")).unwrap();
        assert_eq!(text(&data), b"before\none\ntwoafter the end\n");
    }
}
