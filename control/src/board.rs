//! `outpost board-image`: puts a node agent onto a board's disk image before its first boot.
//! It finds the ext4 root partition of a raw image (MBR or GPT, as Raspberry Pi OS and
//! Debian's arm64 images are laid out) and writes into it, with e2fsprogs' `debugfs` (no
//! loop device, no mount, no root needed): the agent binary, its systemd unit enabled for
//! `multi-user.target`, and `/etc/outpost/node.toml` with the server and a join token, so
//! the board joins the cluster when it first boots. Every file written is read back and
//! compared before the command says it is done.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The unit and the documented configuration file `deploy/install.sh` installs too.
pub const UNIT: &str = include_str!("../../deploy/outpost-node.service");
pub const CONFIG: &str = include_str!("../../deploy/node.toml");

const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("{0}")]
    Image(String),
    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BoardError {
    let what = what.into();
    move |e| BoardError::Io {
        what,
        detail: e.to_string(),
    }
}

/// One partition of an image, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as `/dev/mmcblk0pN` counts.
    pub number: usize,
    pub offset: u64,
    pub size: u64,
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The partitions of a disk image whose first sectors are `head` (at least 34 sectors, for a
/// GPT's header and entries) and whose length is `len`.
pub fn partitions(head: &[u8], len: u64) -> Result<Vec<Partition>, BoardError> {
    if head.len() < 1024 || head[510..512] != [0x55, 0xaa] {
        return Err(BoardError::Image(
            "no partition table (an MBR or GPT disk image is expected)".into(),
        ));
    }
    let entries = |i: usize| &head[446 + 16 * i..446 + 16 * (i + 1)];
    let gpt = (0..4).any(|i| entries(i)[4] == 0xee);
    let mut out = Vec::new();
    if !gpt {
        for i in 0..4 {
            let e = entries(i);
            let (start, count) = (u32_at(e, 8), u32_at(e, 12));
            if e[4] != 0 && count > 0 {
                out.push(Partition {
                    number: i + 1,
                    offset: start * SECTOR,
                    size: count * SECTOR,
                });
            }
        }
    } else {
        let h = &head[SECTOR as usize..];
        if &h[0..8] != b"EFI PART" {
            return Err(BoardError::Image(
                "a protective MBR without a GPT header behind it".into(),
            ));
        }
        let (lba, count, size) = (u64_at(h, 72), u32_at(h, 80), u32_at(h, 84));
        if size < 128 || count > 1024 {
            return Err(BoardError::Image(format!(
                "a GPT with {count} entries of {size} bytes"
            )));
        }
        for i in 0..count {
            let at = (lba * SECTOR + i * size) as usize;
            let Some(e) = head.get(at..at + size as usize) else {
                return Err(BoardError::Image(
                    "GPT entries past the image's head".into(),
                ));
            };
            if e[..16].iter().all(|b| *b == 0) {
                continue;
            }
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            if last >= first {
                out.push(Partition {
                    number: i as usize + 1,
                    offset: first * SECTOR,
                    size: (last - first + 1) * SECTOR,
                });
            }
        }
    }
    for p in &out {
        if p.offset.saturating_add(p.size) > len {
            return Err(BoardError::Image(format!(
                "partition {} ends past the end of the image",
                p.number
            )));
        }
    }
    Ok(out)
}

/// Whether the bytes at a partition's start hold an ext2/3/4 superblock (magic 0xEF53).
pub fn is_ext(first_2k: &[u8]) -> bool {
    first_2k.len() >= 1024 + 58 && first_2k[1024 + 56..1024 + 58] == [0x53, 0xef]
}

/// The architecture of an ELF executable, as Rust names it.
pub fn elf_arch(head: &[u8]) -> Option<&'static str> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return None;
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    Some(match machine {
        0x3e => "x86_64",
        0xb7 => "aarch64",
        0x28 => "arm",
        0xf3 => "riscv64",
        _ => "unknown",
    })
}

/// The agent's configuration for a board: the documented file with the server and token
/// filled in (and the node's name, if given).
pub fn config(server: &str, token: &str, name: Option<&str>) -> Result<String, BoardError> {
    outpost_api::link::Token::parse(token).map_err(BoardError::Image)?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
    };
    if !plain(server) || !server.contains(':') {
        return Err(BoardError::Image(format!(
            "server {server:?}: HOST:PORT of the control plane's node gateway"
        )));
    }
    let mut text = CONFIG
        .replace("@SERVER@", server)
        .replace("@TOKEN@", token.trim());
    if let Some(n) = name {
        let label = n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !label || n.is_empty() {
            return Err(BoardError::Image(format!(
                "node name {n:?}: lowercase letters, digits, '-' and '.'"
            )));
        }
        text = text.replace("# name = \"pi-4\"", &format!("name = \"{n}\""));
    }
    Ok(text)
}

/// What `write` puts into the image.
pub struct Board<'a> {
    pub image: &'a Path,
    pub agent: &'a Path,
    pub server: &'a str,
    pub token: &'a str,
    pub name: Option<&'a str>,
    /// The root partition's number, if not the largest ext4 one.
    pub partition: Option<usize>,
}

/// Where files go in the root file system, with their modes.
const AGENT: &str = "/usr/local/bin/outpost-node";
const UNIT_PATH: &str = "/etc/systemd/system/outpost-node.service";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/outpost-node.service";
const CONFIG_PATH: &str = "/etc/outpost/node.toml";

/// The root partition of `image`: `number`, else the largest ext partition.
pub fn root_partition(image: &Path, number: Option<usize>) -> Result<Partition, BoardError> {
    use std::io::{Read, Seek, SeekFrom};
    let name = image.display().to_string();
    let mut f = std::fs::File::open(image).map_err(io(format!("opening {name}")))?;
    let len = f.metadata().map_err(io(&name))?.len();
    let mut head = vec![0u8; (SECTOR * 64) as usize];
    let n = f.read(&mut head).map_err(io(&name))?;
    head.truncate(n);
    let parts = partitions(&head, len)?;
    let mut ext = Vec::new();
    for p in parts {
        let mut b = vec![0u8; 2048];
        f.seek(SeekFrom::Start(p.offset)).map_err(io(&name))?;
        f.read_exact(&mut b).map_err(io(&name))?;
        if is_ext(&b) {
            ext.push(p);
        }
    }
    match number {
        Some(n) => ext.into_iter().find(|p| p.number == n).ok_or_else(|| {
            BoardError::Image(format!("partition {n} of {name} is not an ext4 file system"))
        }),
        None => ext.into_iter().max_by_key(|p| p.size).ok_or_else(|| {
            BoardError::Image(format!(
                "{name} has no ext4 partition (a board image with an ext4 root file system is expected)"
            ))
        }),
    }
}

/// debugfs on the partition at `offset` of `image`, with `cmds` (one per line); its output.
fn debugfs(image: &Path, offset: u64, write: bool, cmds: &str) -> Result<String, BoardError> {
    let dir = tempdir()?;
    let script = dir.join("cmds");
    std::fs::write(&script, cmds).map_err(io("writing the debugfs script"))?;
    let mut c = Command::new("debugfs");
    if write {
        c.arg("-w");
    }
    let out = c
        .arg("-f")
        .arg(&script)
        .arg(format!("{}?offset={offset}", image.display()))
        .output()
        .map_err(io("running debugfs (from e2fsprogs)"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        return Err(BoardError::Image(format!(
            "debugfs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tempdir() -> Result<PathBuf, BoardError> {
    let d = std::env::temp_dir().join(format!(
        "outpost-board-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).map_err(io("making a temporary directory"))?;
    Ok(d)
}

/// A file of the image's root file system, if it exists (symlinks are followed by
/// debugfs's `dump` only within the file system, so `/bin/sh`-style links may not resolve).
pub fn read_file(image: &Path, part: Partition, path: &str) -> Result<Option<Vec<u8>>, BoardError> {
    let dir = tempdir()?;
    let out = dir.join("out");
    debugfs(
        image,
        part.offset,
        false,
        &format!("dump {path} {}\n", out.display()),
    )?;
    let r = std::fs::read(&out).ok();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(r)
}

/// Write the agent, unit and config into the image; the root partition written.
pub fn write(b: &Board<'_>) -> Result<Partition, BoardError> {
    let agent = std::fs::read(b.agent).map_err(io(format!("reading {}", b.agent.display())))?;
    let Some(arch) = elf_arch(&agent) else {
        return Err(BoardError::Image(format!(
            "{} is not an executable (ELF) file",
            b.agent.display()
        )));
    };
    let config = config(b.server, b.token, b.name)?;
    let part = root_partition(b.image, b.partition)?;
    // An agent of the wrong architecture would never start on the board.
    for probe in ["/usr/bin/env", "/bin/busybox", "/usr/bin/busybox"] {
        if let Some(bin) = read_file(b.image, part, probe)? {
            match elf_arch(&bin) {
                Some(a) if a != arch => {
                    return Err(BoardError::Image(format!(
                        "the image's {probe} is {a} but the agent is {arch}"
                    )))
                }
                Some(_) => break,
                None => {}
            }
        }
    }
    let dir = tempdir()?;
    let (agent_f, unit_f, config_f) = (dir.join("agent"), dir.join("unit"), dir.join("config"));
    let files = std::fs::write(&agent_f, &agent)
        .and_then(|()| std::fs::write(&unit_f, UNIT))
        .and_then(|()| std::fs::write(&config_f, &config));
    if let Err(e) = files {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(io("staging the files")(e));
    }
    let mut cmds = String::new();
    for d in [
        "/usr",
        "/usr/local",
        "/usr/local/bin",
        "/etc",
        "/etc/outpost",
        "/etc/systemd",
        "/etc/systemd/system",
        "/etc/systemd/system/multi-user.target.wants",
    ] {
        // debugfs reports existing directories and goes on.
        cmds.push_str(&format!("mkdir {d}\n"));
    }
    for (src, dst, mode) in [
        (&agent_f, AGENT, "0100755"),
        (&unit_f, UNIT_PATH, "0100644"),
        (&config_f, CONFIG_PATH, "0100600"),
    ] {
        cmds.push_str(&format!(
            "rm {dst}\nwrite {} {dst}\nset_inode_field {dst} mode {mode}\nset_inode_field {dst} uid 0\nset_inode_field {dst} gid 0\n",
            src.display()
        ));
    }
    cmds.push_str(&format!("rm {WANTS}\nsymlink {WANTS} {UNIT_PATH}\n"));
    let r = debugfs(b.image, part.offset, true, &cmds);
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    for (path, want) in [
        (AGENT, agent.as_slice()),
        (UNIT_PATH, UNIT.as_bytes()),
        (CONFIG_PATH, config.as_bytes()),
    ] {
        if read_file(b.image, part, path)?.as_deref() != Some(want) {
            return Err(BoardError::Image(format!(
                "{path} did not read back as written (is the file system full?)"
            )));
        }
    }
    let link = debugfs(b.image, part.offset, false, &format!("stat {WANTS}\n"))?;
    if !link.contains("symlink") {
        return Err(BoardError::Image(format!("{WANTS} was not made")));
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(parts: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut h = vec![0u8; 64 * 512];
        for (i, (ty, start, count)) in parts.iter().enumerate() {
            let e = 446 + 16 * i;
            h[e + 4] = *ty;
            h[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            h[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
        }
        h[510] = 0x55;
        h[511] = 0xaa;
        h
    }

    #[test]
    fn mbr_partitions_in_bytes() {
        let h = mbr(&[(0x0c, 2048, 8192), (0x83, 10240, 65536)]);
        let p = partitions(&h, 100 << 20).expect("parses");
        assert_eq!(
            p,
            [
                Partition {
                    number: 1,
                    offset: 2048 * 512,
                    size: 8192 * 512
                },
                Partition {
                    number: 2,
                    offset: 10240 * 512,
                    size: 65536 * 512
                },
            ]
        );
        assert!(
            partitions(&h, 10 << 20).is_err(),
            "past the end of the image"
        );
        assert!(partitions(&vec![0u8; 4096], 1 << 20).is_err(), "no table");
    }

    #[test]
    fn gpt_partitions_in_bytes() {
        let mut h = mbr(&[(0xee, 1, 0xffff_ffff)]);
        let hdr = 512;
        h[hdr..hdr + 8].copy_from_slice(b"EFI PART");
        h[hdr + 72..hdr + 80].copy_from_slice(&2u64.to_le_bytes());
        h[hdr + 80..hdr + 84].copy_from_slice(&128u32.to_le_bytes());
        h[hdr + 84..hdr + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, (first, last)) in [(2048u64, 4095u64), (4096, 20479)].iter().enumerate() {
            let e = 1024 + 128 * i;
            h[e] = 1; // a non-zero type GUID
            h[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            h[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
        }
        let p = partitions(&h, 20 << 20).expect("parses");
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[1],
            Partition {
                number: 2,
                offset: 4096 * 512,
                size: 16384 * 512
            }
        );
        h[hdr..hdr + 8].copy_from_slice(b"NOT PART");
        assert!(partitions(&h, 20 << 20).is_err());
    }

    #[test]
    fn elf_machines() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[18] = 0xb7;
        assert_eq!(elf_arch(&h), Some("aarch64"));
        h[18] = 0x3e;
        assert_eq!(elf_arch(&h), Some("x86_64"));
        assert_eq!(elf_arch(b"#!/bin/sh\n echo not elf"), None);
    }

    #[test]
    fn config_takes_server_token_and_name_and_refuses_junk() {
        let token = format!(
            "op1.{}.{}.{}",
            "a".repeat(64),
            "b".repeat(6),
            "c".repeat(32)
        );
        let c = config("10.0.0.1:6443", &token, Some("pi-4")).expect("config");
        let t: toml::Table = c.parse().expect("toml");
        assert_eq!(t["server"].as_str(), Some("10.0.0.1:6443"));
        assert_eq!(t["token"].as_str(), Some(token.as_str()));
        assert_eq!(t["name"].as_str(), Some("pi-4"));
        assert!(config("10.0.0.1:6443", "op1.x", None).is_err());
        assert!(config("a\"b:1", &token, None).is_err());
        assert!(config("10.0.0.1:6443", &token, Some("Pi_4")).is_err());
    }
}
