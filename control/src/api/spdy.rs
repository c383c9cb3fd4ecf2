//! SPDY/3.1 framing, the server's half, as much as `kubectl port-forward` uses: kubectl opens
//! streams (SYN_STREAM) and sends DATA; the server replies (SYN_REPLY), sends DATA, echoes
//! PINGs. Windows are not enforced (client-go's spdystream does no flow control, and a
//! server that waits for WINDOW_UPDATE stalls it).
//!
//! Header blocks are zlib streams with the SPDY/3 preset dictionary, one stream per direction
//! for the whole connection, so every block must pass through the same [`Reader`] or
//! [`Writer`] in order.

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Largest frame accepted; kubectl's DATA frames are at most 32 KiB.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest inflated header block accepted.
const MAX_HEADERS: usize = 64 << 10;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 1;

/// RST_STREAM status codes.
pub const PROTOCOL_ERROR: u32 = 1;
pub const INVALID_STREAM: u32 = 2;

/// The SPDY/3 header dictionary: length-prefixed header names and values, then a run of
/// common text (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1).
fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &str = "options head post put delete trace accept accept-charset \
            accept-encoding accept-language accept-ranges age allow authorization cache-control \
            connection content-base content-encoding content-language content-length \
            content-location content-md5 content-range content-type date etag expect expires \
            from host if-match if-modified-since if-none-match if-range if-unmodified-since \
            last-modified location max-forwards pragma proxy-authenticate proxy-authorization \
            range referer retry-after server te trailer transfer-encoding upgrade user-agent \
            vary via warning www-authenticate method get status 200_OK version HTTP/1.1 url \
            public set-cookie keep-alive origin";
        const CODES: &str = "100101201202205206300302303304305306307402405406407408409410411\
            412413414415416417502504505";
        const PHRASES: [&str; 10] = [
            "203 Non-Authoritative Information",
            "204 No Content",
            "301 Moved Permanently",
            "400 Bad Request",
            "401 Unauthorized",
            "403 Forbidden",
            "404 Not Found",
            "500 Internal Server Error",
            "501 Not Implemented",
            "503 Service Unavailable",
        ];
        const REST: &str = "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 \
            Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT\
            chunked,text/html,image/png,image/jpg,image/gif,application/xml,\
            application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=\
            gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";
        let mut d = Vec::with_capacity(1423);
        // One entry holds a space: "200 OK".
        for w in WORDS.split(' ').map(|w| w.replace('_', " ")) {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(CODES.as_bytes());
        for p in PHRASES {
            d.extend_from_slice(p.as_bytes());
        }
        d.extend_from_slice(REST.as_bytes());
        d
    })
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A new stream, with its headers (names lowercase).
    Syn {
        id: u32,
        fin: bool,
        headers: Vec<(String, String)>,
    },
    Data {
        id: u32,
        fin: bool,
        data: Bytes,
    },
    Rst {
        id: u32,
        code: u32,
    },
    Ping(u32),
    GoAway,
    /// SETTINGS, WINDOW_UPDATE, NOOP and the like: nothing to do.
    Ignored,
}

impl Frame {
    /// The value of header `name` on a [`Frame::Syn`].
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Frame::Syn { headers, .. } => headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Parses the client's byte stream into frames.
pub struct Reader {
    buf: BytesMut,
    inflate: Decompress,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            buf: BytesMut::new(),
            inflate: Decompress::new(true),
        }
    }
}

impl Reader {
    /// Bytes as they arrive; frames may span calls.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived. An error means the connection is unusable.
    pub fn frame(&mut self) -> Result<Option<Frame>, String> {
        if self.buf.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_FRAME {
            return Err(format!(
                "SPDY frame of {len} bytes over the limit of {MAX_FRAME}"
            ));
        }
        if self.buf.len() < 8 + len {
            return Ok(None);
        }
        let head = self.buf.split_to(8);
        let body = self.buf.split_to(len).freeze();
        let flags = head[4];
        let fin = flags & FLAG_FIN != 0;
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            return Ok(Some(Frame::Data {
                id,
                fin,
                data: body,
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(format!("SPDY version {version} is not supported (only 3)"));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let word = |b: &[u8], at: usize| -> Result<u32, String> {
            b.get(at..at + 4)
                .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
                .ok_or_else(|| format!("SPDY control frame {kind} is too short"))
        };
        Ok(Some(match kind {
            SYN_STREAM => {
                let id = word(&body, 0)? & 0x7fff_ffff;
                let block = body
                    .get(10..)
                    .ok_or("SPDY SYN_STREAM is too short".to_string())?;
                let headers = self.headers(block)?;
                Frame::Syn { id, fin, headers }
            }
            SYN_REPLY | HEADERS => {
                // Not sent by clients that only open streams, but the block must still go
                // through the inflater to keep it in step.
                self.headers(body.get(4..).unwrap_or_default())?;
                Frame::Ignored
            }
            RST_STREAM => Frame::Rst {
                id: word(&body, 0)? & 0x7fff_ffff,
                code: word(&body, 4)?,
            },
            PING => Frame::Ping(word(&body, 0)?),
            GOAWAY => Frame::GoAway,
            _ => Frame::Ignored,
        }))
    }

    fn headers(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, String> {
        let raw = self.inflate_block(block)?;
        let mut b = raw.as_slice();
        let count = |b: &mut &[u8]| -> Result<usize, String> {
            if b.len() < 4 {
                return Err("SPDY header block is truncated".into());
            }
            Ok(b.get_u32() as usize)
        };
        let text = |b: &mut &[u8]| -> Result<String, String> {
            let n = count(b)?;
            if b.len() < n {
                return Err("SPDY header block is truncated".into());
            }
            let s = String::from_utf8_lossy(&b[..n]).into_owned();
            b.advance(n);
            Ok(s)
        };
        let n = count(&mut b)?;
        let mut out = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let name = text(&mut b)?.to_ascii_lowercase();
            let value = text(&mut b)?;
            out.push((name, value));
        }
        Ok(out)
    }

    fn inflate_block(&mut self, mut input: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(256);
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADERS {
                    return Err(format!(
                        "SPDY header block inflates past {MAX_HEADERS} bytes"
                    ));
                }
                out.reserve(out.len());
            }
            let (was_in, was_out) = (self.inflate.total_in(), out.len());
            let res = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - was_in) as usize;
            input = &input[used..];
            match res {
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|e| format!("SPDY header dictionary: {e}"))?;
                }
                Err(e) => return Err(format!("SPDY header block: {e}")),
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(_) if out.len() < out.capacity() => {
                    if input.is_empty() {
                        return Ok(out);
                    }
                    if used == 0 && out.len() == was_out {
                        return Err("SPDY header block does not inflate".into());
                    }
                }
                Ok(_) => {}
            }
        }
    }
}

/// Encodes the server's frames.
pub struct Writer {
    deflate: Compress,
}

impl Default for Writer {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Only fails for a compressor that has already written; this one has not.
        let _ = deflate.set_dictionary(dictionary());
        Writer { deflate }
    }
}

impl Writer {
    /// Accept stream `id`, with no headers.
    pub fn syn_reply(&mut self, id: u32) -> Vec<u8> {
        let block = self.deflate_block(&0u32.to_be_bytes());
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&block);
        control(SYN_REPLY, 0, &body)
    }

    fn deflate_block(&mut self, raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = raw;
        loop {
            let before = self.deflate.total_in();
            // Compressing into a vector with spare room cannot fail.
            let _ = self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync);
            input = &input[(self.deflate.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(64);
        }
    }
}

/// A DATA frame; `fin` half-closes the stream from our side.
pub fn data(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

pub fn ping(id: u32) -> Vec<u8> {
    control(PING, 0, &id.to_be_bytes())
}

pub fn rst(id: u32, code: u32) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&code.to_be_bytes());
    control(RST_STREAM, 0, &body)
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(body);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client sends: a SYN_STREAM with headers compressed through its own stream.
    fn syn(deflate: &mut Compress, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (n, v) in headers {
            for s in [n, v] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut block = Vec::with_capacity(1024);
        deflate
            .compress_vec(&raw, &mut block, FlushCompress::Sync)
            .unwrap();
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&block);
        control(SYN_STREAM, 0, &body)
    }

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // Its Adler-32 is what zlib streams that use it name in their header.
        let mut c = Compress::new(Compression::default(), true);
        assert_eq!(c.set_dictionary(d).unwrap(), 0xe3c6_a7c2);
    }

    #[test]
    fn frames_parse_across_arbitrary_splits() {
        let mut client = Compress::new(Compression::default(), true);
        client.set_dictionary(dictionary()).unwrap();
        let mut wire = syn(
            &mut client,
            1,
            &[("streamType", "error"), ("port", "80"), ("requestID", "0")],
        );
        wire.extend(data(1, true, b""));
        wire.extend(syn(
            &mut client,
            3,
            &[("streamType", "data"), ("port", "80"), ("requestID", "0")],
        ));
        wire.extend(data(3, false, b"GET / HTTP/1.0\r\n\r\n"));
        wire.extend(ping(1));
        wire.extend(rst(3, 5));
        for step in [1, 3, 7, wire.len()] {
            let mut r = Reader::default();
            let mut frames = vec![];
            for chunk in wire.chunks(step) {
                r.feed(chunk);
                while let Some(f) = r.frame().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(frames.len(), 6, "step {step}");
            assert_eq!(frames[0].header("streamtype"), Some("error"));
            assert_eq!(frames[0].header("requestid"), Some("0"));
            assert_eq!(
                frames[1],
                Frame::Data {
                    id: 1,
                    fin: true,
                    data: Bytes::new()
                }
            );
            assert_eq!(frames[2].header("streamtype"), Some("data"));
            assert_eq!(frames[2].header("port"), Some("80"));
            assert!(
                matches!(&frames[3], Frame::Data { id: 3, fin: false, data } if &data[..] == b"GET / HTTP/1.0\r\n\r\n")
            );
            assert_eq!(frames[4], Frame::Ping(1));
            assert_eq!(frames[5], Frame::Rst { id: 3, code: 5 });
        }
    }

    #[test]
    fn replies_inflate_with_the_dictionary() {
        let mut w = Writer::default();
        let mut inflate = Decompress::new(true);
        for id in [1u32, 3, 5] {
            let f = w.syn_reply(id);
            assert_eq!(&f[..4], &[0x80, 3, 0, 2]);
            assert_eq!(u32::from_be_bytes([f[8], f[9], f[10], f[11]]), id);
            let mut out = Vec::with_capacity(64);
            let mut block = &f[12..];
            loop {
                let before = inflate.total_in();
                match inflate.decompress_vec(block, &mut out, FlushDecompress::Sync) {
                    Err(e) if e.needs_dictionary() == Some(0xe3c6_a7c2) => {
                        inflate.set_dictionary(dictionary()).unwrap();
                    }
                    r => {
                        r.unwrap();
                    }
                }
                block = &block[(inflate.total_in() - before) as usize..];
                if block.is_empty() {
                    break;
                }
            }
            assert_eq!(out, [0, 0, 0, 0], "an empty header block");
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut r = Reader::default();
        r.feed(&[0x80, 2, 0, 1, 0, 0, 0, 0]);
        assert!(r.frame().unwrap_err().contains("version 2"));
        let mut r = Reader::default();
        r.feed(&[0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff]);
        assert!(r.frame().unwrap_err().contains("over the limit"));
        let mut r = Reader::default();
        r.feed(&control(
            SYN_STREAM,
            0,
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3],
        ));
        assert!(r.frame().is_err(), "garbage where a zlib stream should be");
        let mut r = Reader::default();
        r.feed(&control(RST_STREAM, 0, &[0, 0]));
        assert!(r.frame().unwrap_err().contains("too short"));
    }
}
