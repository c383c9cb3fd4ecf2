//! Pseudo-terminals for `kubectl exec -t` and containers whose spec has `tty`: the agent
//! keeps the master side ([`Terminal`]) and hands the other side to the process as its
//! stdin, stdout and stderr, so a shell there sees a terminal (prompt, echo, line editing)
//! and its window follows the client's.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

/// The agent's side of a pseudo-terminal.
pub struct Terminal {
    master: AsyncFd<File>,
}

nix::ioctl_write_ptr_bad!(set_window, nix::libc::TIOCSWINSZ, nix::pty::Winsize);

impl Terminal {
    /// A new terminal and its other side, for the process. Needs a tokio runtime.
    #[allow(unsafe_code)]
    pub fn open() -> std::io::Result<(Terminal, OwnedFd)> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd as _;
        let pty = nix::pty::openpty(None, None)?;
        let fd = pty.master.as_raw_fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the file is the AsyncFd's own, so its descriptor stays open for as long as
        // the registration.
        let master = unsafe { AsyncFd::register(File::from(pty.master)) }?;
        Ok((Terminal { master }, pty.slave))
    }

    /// What the process wrote; 0 once every holder of the other side has closed it (the
    /// kernel says EIO then).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.master.readable().await?;
            match ready.try_io(|f| f.get_ref().read(buf)) {
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_) => continue,
            }
        }
    }

    /// What the process has written and not yet been read, without waiting for more.
    pub fn read_now(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.master.get_ref().read(buf) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            r => r,
        }
    }

    /// Type `bytes` at the terminal.
    pub async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let mut ready = self.master.writable().await?;
            match ready.try_io(|f| f.get_ref().write(bytes)) {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => bytes = &bytes[n..],
                Ok(Err(e)) => return Err(e),
                Err(_) => continue,
            }
        }
        Ok(())
    }

    /// Whether `typed` holds the terminal's interrupt character (^C) while the terminal
    /// makes signals of such characters (`ISIG`, off in raw mode, where ^C is data).
    pub fn interrupts(&self, typed: &[u8]) -> bool {
        use nix::sys::termios::{tcgetattr, LocalFlags, SpecialCharacterIndices};
        let Ok(t) = tcgetattr(self.master.get_ref()) else {
            return false;
        };
        let intr = t.control_chars[SpecialCharacterIndices::VINTR as usize];
        t.local_flags.contains(LocalFlags::ISIG) && intr != 0 && typed.contains(&intr)
    }

    /// The client's window is now `width` columns by `height` rows; a size of nothing (what
    /// a client that has no window sends) leaves it as it was.
    #[allow(unsafe_code)]
    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        if width == 0 || height == 0 {
            return Ok(());
        }
        let size = nix::pty::Winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: the descriptor is this terminal's master, open for as long as `self`, and
        // the kernel only reads the `winsize` it is given.
        unsafe { set_window(self.master.get_ref().as_raw_fd(), &size) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_on_the_terminal_sees_one_and_its_size() {
        let (t, slave) = Terminal::open().unwrap();
        t.resize(123, 45).unwrap();
        let child = tokio::process::Command::new("sh")
            .args([
                "-c",
                "test -t 0 && test -t 1 && stty size; read line; echo got $line",
            ])
            .stdin(std::process::Stdio::from(slave.try_clone().unwrap()))
            .stdout(std::process::Stdio::from(slave.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(slave))
            .spawn()
            .unwrap();
        t.write_all(b"hello\n").await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = t.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let status = child.wait_with_output().await.unwrap().status;
        let text = String::from_utf8_lossy(&out).replace('\r', "");
        assert!(status.success(), "{text}");
        // The terminal echoes what was typed, as a terminal does.
        assert!(text.contains("45 123\n"), "{text}");
        assert!(
            text.contains("hello\n") && text.contains("got hello\n"),
            "{text}"
        );
    }
}
