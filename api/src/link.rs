//! The node link: what a node agent and the control plane's gateway say to each other over
//! QUIC.
//!
//! Every message is one frame: a 4-byte big-endian length, then CBOR. A node joins once on a
//! connection with ALPN [`ALPN_JOIN`] (no client certificate; a bootstrap [`Token`] and a CSR
//! in a [`JoinRequest`]) and from then on connects with ALPN [`ALPN_NODE`] and the client
//! certificate it was given. On that connection each stream carries one exchange: the node
//! opens streams with an [`Up`] frame (an API request, a lease renewal), the control plane
//! opens streams with a [`Down`] frame (logs, port-forward). A [`Head`] frame answers; a body, if any,
//! follows as raw bytes up to the end of the stream, so a watch or `logs -f` is a stream that
//! stays open.
//!
//! A new control-plane member bootstraps the same way, with ALPN [`ALPN_MEMBER`]: a member
//! token in a [`MemberRequest`] buys the cluster's CAs and the address of a member to join
//! through ([`MemberReply`]).
//!
//! A member asked for a node linked to another member reaches it through that member's
//! gateway, with ALPN [`ALPN_RELAY`] and a cluster-CA certificate in [`MEMBERS_GROUP`]: each
//! stream starts with a [`Relay`] frame, the other member opens the [`Down`] stream toward
//! the node, and from its [`Head`] on the bytes go through as they come, both ways.

use serde::{Deserialize, Serialize};

pub const ALPN_JOIN: &[u8] = b"outpost-join/1";
pub const ALPN_NODE: &[u8] = b"outpost-node/1";
pub const ALPN_MEMBER: &[u8] = b"outpost-member/1";
/// Between members: a stream toward a node linked to the other member ([`Relay`]).
pub const ALPN_RELAY: &[u8] = b"outpost-relay/1";
/// The organization in the client certificate a member presents on a relay connection.
pub const MEMBERS_GROUP: &str = "outpost:members";
/// The name in the gateway's certificate; nodes connect to it whatever address they dial, so
/// a gateway behind NAT or a changed address keeps working. Trust comes from the pinned CA.
pub const GATEWAY_NAME: &str = "gateway.outpost";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 4 << 20;
/// Both ends send keep-alives this often, well inside the idle timeout, so a quiet link
/// through NAT stays mapped.
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);
/// A link that hears nothing for this long is lost, and the node reconnects.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A bootstrap token: `op1.<sha-256 of the cluster CA, hex>.<id>.<secret>`. The CA hash lets
/// a node trust the gateway before it has any certificate (as kubeadm's CA hash does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_hash: String,
    pub id: String,
    pub secret: String,
}

impl Token {
    pub fn parse(s: &str) -> Result<Token, String> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let hex = |p: &str, len: usize| {
            p.len() == len
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        match parts.as_slice() {
            ["op1", ca, id, secret] if hex(ca, 64) && hex(id, 6) && hex(secret, 32) => Ok(Token {
                ca_hash: ca.to_string(),
                id: id.to_string(),
                secret: secret.to_string(),
            }),
            _ => Err(
                "a token looks like op1.<64 hex digits>.<6 hex digits>.<32 hex digits> (from `outpost token create`)"
                    .into(),
            ),
        }
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "op1.{}.{}.{}", self.ca_hash, self.id, self.secret)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's id and secret (the CA hash stays with the node).
    pub id: String,
    pub secret: String,
    /// The node's name; its certificate will say `system:node:<name>`.
    pub node: String,
    /// A PEM certificate signing request for the node's key.
    pub csr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JoinReply {
    /// PEM certificate for the node and the cluster CA.
    Issued {
        cert: String,
        ca: String,
    },
    Refused(String),
}

/// A would-be control-plane member's request for the cluster's CAs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRequest {
    /// A member token's id and secret.
    pub id: String,
    pub secret: String,
    /// The id the new member will have in the store.
    pub member: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberReply {
    /// The PEM files a member keeps in its pki directory, and the peer (Raft) address of the
    /// member that answered, to join through.
    Admitted {
        peer_ca_crt: String,
        peer_ca_key: String,
        ca_crt: String,
        ca_key: String,
        join: String,
    },
    Refused(String),
}

/// The first frame of a stream a node opens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Up {
    /// A Kubernetes API request made as the node. Answered by a [`Head`] and the response
    /// body.
    Call {
        method: String,
        /// Path and query.
        path: String,
        content_type: Option<String>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// The node is alive. Answered by a [`Head`] with status 200 and no body.
    Renew,
    /// A new certificate for the node's key (a PEM CSR), before the current one expires.
    /// Answered by a [`Head`]; on 200 the body is the PEM certificate.
    Certify { csr: String },
}

/// The first frame of a relay stream: the node, and what to open toward it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Relay {
    pub node: String,
    pub down: Down,
}

/// The first frame of a stream the control plane opens toward a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Down {
    Logs(LogRequest),
    /// `kubectl port-forward` to one port of a pod. On a 200 [`Head`] the stream carries the
    /// connection's bytes both ways; each side finishes its half when its peer does.
    PortForward(ForwardRequest),
    /// `kubectl exec`: a command in a running container. On a 200 [`Head`] both sides send
    /// [`ExecFrame`]s until the node's [`ExecFrame::Exit`].
    Exec(ExecRequest),
    /// `kubectl attach` (and `kubectl run -i`): the running container's output from now on
    /// and, where its spec has `stdin`, input to it; `command` is empty. The frames are
    /// [`Down::Exec`]'s, and the [`ExecFrame::Exit`] comes when the run has ended.
    Attach(ExecRequest),
    /// What the node and its running containers use now (`kubectl top`, as metrics-server
    /// asks each kubelet). On a 200 [`Head`] one [`Usage`] frame follows.
    Usage,
}

/// A node's resource use: CPU as a rate averaged over the window before `time`, memory as
/// the working set at `time`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// RFC 3339.
    pub time: String,
    pub window_ms: u64,
    pub node: Use,
    pub pods: Vec<PodUsage>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodUsage {
    pub namespace: String,
    pub name: String,
    /// Running containers only, by name.
    pub containers: Vec<(String, Use)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Use {
    pub nanocores: u64,
    pub memory: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub command: Vec<String>,
    /// The client sends input; without it the command's stdin is closed at once.
    pub stdin: bool,
    pub tty: bool,
}

/// One frame of an exec stream: input toward the node, output and the end back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExecFrame {
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// No more input: the command's stdin is closed.
    StdinEnd,
    /// The client's terminal is now this many columns and rows (with `tty`).
    Resize {
        width: u16,
        height: u16,
    },
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The command ended with this code, or could not run (`error`).
    Exit {
        code: i32,
        error: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub namespace: String,
    pub pod: String,
    pub port: u16,
}

/// `kubectl logs` for one container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub since_seconds: Option<u64>,
    pub limit_bytes: Option<u64>,
}

/// How an exchange went; a body follows for [`Up::Call`] and [`Down::Logs`], a byte stream
/// both ways for [`Down::PortForward`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub status: u16,
    pub content_type: Option<String>,
}

fn bad(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// One frame: length, then CBOR.
pub fn encode<T: Serialize>(msg: &T) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    ciborium::into_writer(msg, &mut buf).map_err(bad)?;
    let len = u32::try_from(buf.len() - 4).map_err(bad)?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

#[cfg(feature = "io")]
pub async fn write_frame<W, T>(w: &mut W, msg: &T, max: usize) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    use tokio::io::AsyncWriteExt;
    let buf = encode(msg)?;
    if buf.len() - 4 > max {
        return Err(std::io::Error::other(format!(
            "frame of {} bytes over the limit of {max}",
            buf.len() - 4
        )));
    }
    w.write_all(&buf).await
}

/// Read one frame of at most `max` bytes. A shorter stream is `UnexpectedEof`; a frame over
/// the limit or not decoding as `T` is `InvalidData`.
#[cfg(feature = "io")]
pub async fn read_frame<R, T>(r: &mut R, max: usize) -> std::io::Result<T>
where
    R: tokio::io::AsyncRead + Unpin,
    T: serde::de::DeserializeOwned,
{
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(bad(format!("frame of {len} bytes over the limit of {max}")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    ciborium::from_reader(buf.as_slice()).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_refusals() {
        let t = Token {
            ca_hash: "ab".repeat(32),
            id: "0a1b2c".into(),
            secret: "f".repeat(32),
        };
        assert_eq!(Token::parse(&t.to_string()), Ok(t));
        for bad in [
            "",
            "op1.ab.cd.ef",
            &format!("op2.{}.0a1b2c.{}", "a".repeat(64), "f".repeat(32)),
            &format!("op1.{}.0A1B2C.{}", "a".repeat(64), "f".repeat(32)),
        ] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_carry_their_length() {
        let f = encode(&Up::Renew).unwrap();
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let back: Up = ciborium::from_reader(&f[4..]).unwrap();
        assert!(matches!(back, Up::Renew));
    }
}
