//! The agents' channel: authenticated, encrypted messages between two host agents over TCP.
//!
//! A migration hands a VM's iSCSI session, CHAP secrets included, from one agent to another, so
//! only agents of the same cluster may talk and nobody on the network may read or alter what
//! they say. Both sides hold the cluster's pre-shared key ([`ClusterKey`]); the channel runs the
//! Noise handshake `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` with that key as the PSK and a fixed
//! prologue naming this protocol's version. A peer with another key (or another version, or no
//! Noise at all) fails the handshake: [`ChannelError::Refused`]. Each side's host name travels
//! encrypted in its handshake message.
//!
//! After the handshake a [`Channel`] carries whole messages of up to 64 MiB, in order. On the
//! wire every Noise message is a 2-byte big-endian length and the ciphertext; an application
//! message is one Noise message holding its 4-byte length, then its bytes in Noise messages of
//! at most 65519 bytes of plaintext. Each direction has its own nonce counter, so a dropped,
//! repeated, reordered or altered Noise message fails authentication ([`ChannelError::Corrupt`]),
//! and the two halves of a [`Channel::split`] work from different tasks without a lock.
//!
//! Not here: key management (distributing, rotating, revoking the cluster key is the operator's
//! business; every holder of the key is trusted alike, and the host name a peer announces is
//! only as trustworthy as the key), forward secrecy against a stolen key *and* a recorded
//! handshake beyond what Noise's ephemeral keys give, replay protection across connections
//! beyond Noise's fresh ephemeral keys per connection, and any end-of-conversation marker: a
//! connection cut at a message boundary looks like [`ChannelError::Closed`], so the protocol
//! on top must say when it is done.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use snow::{HandshakeState, StatelessTransportState};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake hash: an agent speaking another version of this channel fails the
/// handshake instead of misreading messages.
const PROLOGUE: &[u8] = b"viscsi migration channel v1";
/// Ties the derived key to this use, so the key file's contents are never used as a key as is.
const KEY_DOMAIN: &[u8] = b"viscsi cluster key v1";
const MIN_KEY_FILE_LEN: usize = 16;

/// Largest application message.
const MAX_MESSAGE: usize = 64 << 20;
const MAX_HOST_LEN: usize = 255;
/// Noise's limit on one message, tag included.
const NOISE_MAX: usize = 65535;
const TAG_LEN: usize = 16;
const DH_LEN: usize = 32;
/// Plaintext bytes per Noise message.
const MAX_CHUNK: usize = NOISE_MAX - TAG_LEN;
/// The Noise message that opens an application message holds its length.
const HEADER_LEN: usize = 4;
/// A handshake message is an ephemeral key, the encrypted host name and its tag.
const MIN_HANDSHAKE_MSG: usize = DH_LEN + TAG_LEN;
const MAX_HANDSHAKE_MSG: usize = DH_LEN + MAX_HOST_LEN + TAG_LEN;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The sender encrypts about this much before one write: few system calls for large messages,
/// a bounded buffer whatever the message size.
const WRITE_BATCH: usize = 1 << 20;
/// Room for a whole Noise message and its length in the receive buffer.
const READ_BUFFER: usize = 2 * (NOISE_MAX + 2);

/// The cluster's shared credential: 32 bytes derived from a key file. Debug never shows it.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// Reads a key file: its contents (one trailing newline stripped) must be at least 16 bytes,
    /// else Err("cluster key file PATH: too short (at least 16 bytes)"). Other errors name the
    /// path. The key is SHA-256 over a fixed domain string ("viscsi cluster key v1") followed by
    /// the contents.
    pub fn from_file(path: &Path) -> Result<ClusterKey, String> {
        let contents =
            std::fs::read(path).map_err(|e| format!("cluster key file {}: {e}", path.display()))?;
        let secret = contents.strip_suffix(b"\n").unwrap_or(&contents);
        if secret.len() < MIN_KEY_FILE_LEN {
            return Err(format!(
                "cluster key file {}: too short (at least {MIN_KEY_FILE_LEN} bytes)",
                path.display()
            ));
        }
        Ok(ClusterKey::from_bytes(secret))
    }

    /// Same derivation from bytes in memory (for the demo and tests).
    pub fn from_bytes(secret: &[u8]) -> ClusterKey {
        let digest = Sha256::new()
            .chain_update(KEY_DOMAIN)
            .chain_update(secret)
            .finalize();
        ClusterKey(digest.into())
    }

    /// A fresh random key's file contents: 64 lowercase hex chars + "\n".
    ///
    /// Panics if the operating system has no randomness to give: a predictable cluster key
    /// would be worse than no key.
    pub fn generate_file_contents() -> String {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).expect("the operating system's random source failed");
        let mut text = String::with_capacity(65);
        for b in bytes {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('\n');
        text
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// Why a channel could not be opened or used. No variant ever carries key material.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot reach {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The handshake failed: the peer does not hold the cluster key (or is not an agent).
    #[error("{peer} refused: not the same cluster key (or not a viscsi agent)")]
    Refused { peer: String },
    #[error("channel to {peer}: {reason}")]
    Io { peer: String, reason: String },
    /// A message failed authentication or was malformed after the handshake.
    #[error("channel to {peer}: corrupt message")]
    Corrupt { peer: String },
    #[error("channel to {peer} closed")]
    Closed { peer: String },
    #[error("channel to {peer}: no answer within {secs} s")]
    Timeout { peer: String, secs: u64 },
}

/// What one side brings to a handshake.
struct Local {
    key: ClusterKey,
    host: String,
}

/// Listens for other agents.
pub struct ChannelListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    local: Arc<Local>,
}

impl ChannelListener {
    /// `addr` is "host:port" (port 0 allowed). `host` is this agent's host name, sent to the
    /// peer inside the encrypted handshake payload.
    pub async fn bind(
        addr: &str,
        key: ClusterKey,
        host: String,
    ) -> Result<ChannelListener, String> {
        check_own_host(&host)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        Ok(ChannelListener {
            listener,
            local_addr,
            local: Arc::new(Local { key, host }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts one TCP connection (cheap; the handshake is done by [`Incoming::handshake`], so
    /// a slow peer does not hold up the accept loop).
    pub async fn accept(&self) -> io::Result<Incoming> {
        let (stream, remote_addr) = self.listener.accept().await?;
        set_nodelay(&stream);
        Ok(Incoming {
            stream,
            remote_addr,
            local: self.local.clone(),
        })
    }
}

impl fmt::Debug for ChannelListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelListener")
            .field("local_addr", &self.local_addr)
            .field("host", &self.local.host)
            .finish_non_exhaustive()
    }
}

/// A TCP connection from a would-be peer, not yet authenticated.
pub struct Incoming {
    stream: TcpStream,
    remote_addr: SocketAddr,
    local: Arc<Local>,
}

impl Incoming {
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// Responder side of the handshake, bounded at 5 s.
    pub async fn handshake(self) -> Result<Channel, ChannelError> {
        let Incoming {
            mut stream,
            remote_addr,
            local,
        } = self;
        let label = remote_addr.to_string();
        let result = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            respond(&mut stream, &local.key, &local.host),
        )
        .await;
        let (transport, peer) = match result {
            Err(_) => {
                return Err(ChannelError::Timeout {
                    peer: label,
                    secs: HANDSHAKE_TIMEOUT.as_secs(),
                })
            }
            Ok(Err(fail)) => return Err(fail.responder_error(label)),
            Ok(Ok(done)) => done,
        };
        Ok(Channel::new(stream, transport, peer))
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("remote_addr", &self.remote_addr)
            .finish_non_exhaustive()
    }
}

/// Initiator side: TCP connect (5 s bound) + handshake (5 s bound). `host` is our host name.
pub async fn connect(addr: &str, key: &ClusterKey, host: &str) -> Result<Channel, ChannelError> {
    let unreachable = |reason: String| ChannelError::Connect {
        addr: addr.to_string(),
        reason,
    };
    check_own_host(host).map_err(unreachable)?;
    let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )))
        }
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Ok(Ok(stream)) => stream,
    };
    set_nodelay(&stream);
    let (transport, peer) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, initiate(&mut stream, key, host)).await {
            Err(_) => {
                return Err(ChannelError::Timeout {
                    peer: addr.to_string(),
                    secs: HANDSHAKE_TIMEOUT.as_secs(),
                })
            }
            Ok(Err(fail)) => return Err(fail.initiator_error(addr.to_string())),
            Ok(Ok(done)) => done,
        };
    Ok(Channel::new(stream, transport, peer))
}

/// Latency matters more than packet count: requests are small and answered one by one.
fn set_nodelay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "migration channel: cannot set TCP_NODELAY");
    }
}

fn check_own_host(host: &str) -> Result<(), String> {
    if host.len() > MAX_HOST_LEN {
        return Err(format!(
            "host name of {} bytes is longer than {MAX_HOST_LEN}",
            host.len()
        ));
    }
    Ok(())
}

/// How a handshake went wrong, before it is told as seen from one side.
enum HandshakeFailure {
    /// The peer closed the connection before sending anything.
    Eof,
    /// Malformed or unauthenticated: wrong key, other version, not Noise.
    Bad,
    Io(io::Error),
    /// Our own Noise setup failed (never expected).
    Setup(snow::Error),
}

impl From<io::Error> for HandshakeFailure {
    fn from(e: io::Error) -> Self {
        HandshakeFailure::Io(e)
    }
}

impl HandshakeFailure {
    /// The initiator has sent its message; a responder that cannot authenticate it hangs up,
    /// so a connection ended or reset now means "refused".
    fn initiator_error(self, peer: String) -> ChannelError {
        match self {
            HandshakeFailure::Eof | HandshakeFailure::Bad => ChannelError::Refused { peer },
            HandshakeFailure::Io(e) if is_hangup(&e) => ChannelError::Refused { peer },
            HandshakeFailure::Io(e) => ChannelError::Io {
                peer,
                reason: e.to_string(),
            },
            HandshakeFailure::Setup(e) => ChannelError::Io {
                peer,
                reason: format!("noise setup: {e}"),
            },
        }
    }

    /// A connection that ends before saying anything is a port probe, not a refusal.
    fn responder_error(self, peer: String) -> ChannelError {
        match self {
            HandshakeFailure::Eof => ChannelError::Closed { peer },
            HandshakeFailure::Bad => ChannelError::Refused { peer },
            HandshakeFailure::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                ChannelError::Refused { peer }
            }
            HandshakeFailure::Io(e) => ChannelError::Io {
                peer,
                reason: e.to_string(),
            },
            HandshakeFailure::Setup(e) => ChannelError::Io {
                peer,
                reason: format!("noise setup: {e}"),
            },
        }
    }
}

fn is_hangup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn new_handshake(key: &ClusterKey, initiator: bool) -> Result<HandshakeState, HandshakeFailure> {
    let params = NOISE_PARAMS.parse().map_err(HandshakeFailure::Setup)?;
    let builder = snow::Builder::new(params).prologue(PROLOGUE).psk(0, &key.0);
    let state = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    };
    state.map_err(HandshakeFailure::Setup)
}

/// `-> psk, e` with our host name; `<- e, ee` with the responder's.
async fn initiate(
    stream: &mut TcpStream,
    key: &ClusterKey,
    host: &str,
) -> Result<(StatelessTransportState, String), HandshakeFailure> {
    let mut noise = new_handshake(key, true)?;
    write_handshake_message(stream, &mut noise, host).await?;
    let peer = read_handshake_message(stream, &mut noise).await?;
    let transport = noise
        .into_stateless_transport_mode()
        .map_err(HandshakeFailure::Setup)?;
    Ok((transport, peer))
}

async fn respond(
    stream: &mut TcpStream,
    key: &ClusterKey,
    host: &str,
) -> Result<(StatelessTransportState, String), HandshakeFailure> {
    let mut noise = new_handshake(key, false)?;
    let peer = read_handshake_message(stream, &mut noise).await?;
    write_handshake_message(stream, &mut noise, host).await?;
    let transport = noise
        .into_stateless_transport_mode()
        .map_err(HandshakeFailure::Setup)?;
    Ok((transport, peer))
}

async fn write_handshake_message(
    stream: &mut TcpStream,
    noise: &mut HandshakeState,
    host: &str,
) -> Result<(), HandshakeFailure> {
    let mut frame = vec![0u8; 2 + MAX_HANDSHAKE_MSG];
    let len = noise
        .write_message(host.as_bytes(), &mut frame[2..])
        .map_err(HandshakeFailure::Setup)?;
    let len16 = u16::try_from(len).map_err(|_| HandshakeFailure::Bad)?;
    frame[..2].copy_from_slice(&len16.to_be_bytes());
    stream.write_all(&frame[..2 + len]).await?;
    Ok(())
}

/// Reads one length-prefixed handshake message and returns the peer's host name from it. Reads
/// exactly the message's bytes, so whatever the peer sends next stays in the socket.
async fn read_handshake_message(
    stream: &mut TcpStream,
    noise: &mut HandshakeState,
) -> Result<String, HandshakeFailure> {
    let mut len = [0u8; 2];
    if stream.read(&mut len[..1]).await? == 0 {
        return Err(HandshakeFailure::Eof);
    }
    stream.read_exact(&mut len[1..]).await?;
    let len = usize::from(u16::from_be_bytes(len));
    // Checked before reading on, so garbage cannot make us wait for bytes that never come.
    if !(MIN_HANDSHAKE_MSG..=MAX_HANDSHAKE_MSG).contains(&len) {
        return Err(HandshakeFailure::Bad);
    }
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).await?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_MSG];
    let n = noise
        .read_message(&message, &mut payload)
        .map_err(|_| HandshakeFailure::Bad)?;
    payload.truncate(n);
    if payload.len() > MAX_HOST_LEN {
        return Err(HandshakeFailure::Bad);
    }
    String::from_utf8(payload).map_err(|_| HandshakeFailure::Bad)
}

/// What both halves of a channel share: the keys (each half uses only its direction's) and
/// the peer's name.
struct Shared {
    transport: StatelessTransportState,
    peer: String,
}

/// An established channel: ordered, reliable, encrypted messages of up to 64 MiB each.
pub struct Channel {
    sender: ChannelSender,
    receiver: ChannelReceiver,
}

impl Channel {
    fn new(stream: TcpStream, transport: StatelessTransportState, peer: String) -> Channel {
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared { transport, peer });
        Channel {
            sender: ChannelSender {
                shared: shared.clone(),
                write,
                nonce: 0,
                buf: Vec::new(),
                broken: false,
            },
            receiver: ChannelReceiver {
                shared,
                read: BufReader::with_capacity(READ_BUFFER, read),
                nonce: 0,
                ciphertext: vec![0u8; NOISE_MAX],
                broken: false,
            },
        }
    }

    /// The peer's host name from its handshake payload.
    pub fn peer(&self) -> &str {
        &self.sender.shared.peer
    }

    pub fn split(self) -> (ChannelSender, ChannelReceiver) {
        (self.sender, self.receiver)
    }

    pub async fn send(&mut self, message: &[u8]) -> Result<(), ChannelError> {
        self.sender.send(message).await
    }

    pub async fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        self.receiver.recv().await
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.peer())
            .finish_non_exhaustive()
    }
}

/// The sending half of a [`Channel`].
pub struct ChannelSender {
    shared: Arc<Shared>,
    write: OwnedWriteHalf,
    /// Nonce of the next Noise message we send; the receiver counts along.
    nonce: u64,
    /// Encrypted frames waiting for one write; kept to reuse its allocation.
    buf: Vec<u8>,
    /// A send failed or was cancelled part way: the peer's nonce count is out of step with ours.
    broken: bool,
}

impl ChannelSender {
    /// Sends one message. Not cancel-safe: a send dropped part way leaves the channel unusable
    /// (later sends fail), since the peer would see half a message.
    pub async fn send(&mut self, message: &[u8]) -> Result<(), ChannelError> {
        if message.len() > MAX_MESSAGE {
            return Err(self.io_error(format!(
                "message of {} bytes is over the limit of {MAX_MESSAGE} bytes",
                message.len()
            )));
        }
        if self.broken {
            return Err(self.io_error("an earlier send failed or was cancelled".to_string()));
        }
        self.broken = true;
        let declared = u32::try_from(message.len())
            .map_err(|_| self.io_error("message too long".to_string()))?;
        let mut filled = 0;
        self.seal(&declared.to_be_bytes(), &mut filled)?;
        for chunk in message.chunks(MAX_CHUNK) {
            if filled >= WRITE_BATCH {
                self.flush_buf(filled).await?;
                filled = 0;
            }
            self.seal(chunk, &mut filled)?;
        }
        self.flush_buf(filled).await?;
        self.broken = false;
        Ok(())
    }

    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Encrypts one Noise message into the buffer after its length.
    fn seal(&mut self, plaintext: &[u8], filled: &mut usize) -> Result<(), ChannelError> {
        let need = *filled + 2 + plaintext.len() + TAG_LEN;
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        let sealed = self
            .shared
            .transport
            .write_message(self.nonce, plaintext, &mut self.buf[*filled + 2..need])
            .map_err(|e| ChannelError::Io {
                peer: self.shared.peer.clone(),
                reason: format!("cannot encrypt: {e}"),
            })?;
        let len = u16::try_from(sealed).map_err(|_| self.io_error("frame too long".to_string()))?;
        self.buf[*filled..*filled + 2].copy_from_slice(&len.to_be_bytes());
        self.nonce += 1;
        *filled += 2 + sealed;
        Ok(())
    }

    async fn flush_buf(&mut self, filled: usize) -> Result<(), ChannelError> {
        if let Err(e) = self.write.write_all(&self.buf[..filled]).await {
            return Err(if is_hangup(&e) {
                ChannelError::Closed {
                    peer: self.shared.peer.clone(),
                }
            } else {
                self.io_error(e.to_string())
            });
        }
        Ok(())
    }

    fn io_error(&self, reason: String) -> ChannelError {
        ChannelError::Io {
            peer: self.shared.peer.clone(),
            reason,
        }
    }
}

impl fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelSender")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

/// The receiving half of a [`Channel`].
pub struct ChannelReceiver {
    shared: Arc<Shared>,
    read: BufReader<OwnedReadHalf>,
    /// Nonce of the next Noise message we expect.
    nonce: u64,
    /// One Noise message's ciphertext, decrypted from here into the message.
    ciphertext: Vec<u8>,
    /// A receive failed or was cancelled inside a message: we no longer know where the next
    /// one starts.
    broken: bool,
}

impl ChannelReceiver {
    /// Receives one message; `Closed` on a clean end of the connection between messages.
    ///
    /// Cancel-safe while waiting for a message to start (so `recv` may sit under a timeout or
    /// in a `select!`); cancelled once the message's bytes arrive, it leaves the channel
    /// unusable.
    pub async fn recv(&mut self) -> Result<Vec<u8>, ChannelError> {
        if self.broken {
            return Err(self.io_error(
                "an earlier receive failed or was cancelled inside a message".to_string(),
            ));
        }
        // Waits without consuming anything, which is what makes the wait cancel-safe.
        let at_end = match self.read.fill_buf().await {
            Ok(available) => available.is_empty(),
            Err(e) => return Err(self.read_error(e)),
        };
        if at_end {
            return Err(ChannelError::Closed {
                peer: self.shared.peer.clone(),
            });
        }
        self.broken = true;
        let mut header = [0u8; HEADER_LEN];
        self.open(&mut header).await?;
        let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            return Err(self.corrupt());
        }
        // Zeroed memory for large sizes comes fresh from the allocator, not byte by byte.
        let mut message = vec![0u8; len];
        for chunk in message.chunks_mut(MAX_CHUNK) {
            self.open(chunk).await?;
        }
        self.broken = false;
        Ok(message)
    }

    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Reads the next Noise message, which must hold exactly `out.len()` bytes of plaintext,
    /// and decrypts it into `out`.
    async fn open(&mut self, out: &mut [u8]) -> Result<(), ChannelError> {
        let mut len = [0u8; 2];
        self.read
            .read_exact(&mut len)
            .await
            .map_err(|e| self.read_error(e))?;
        let len = usize::from(u16::from_be_bytes(len));
        if len != out.len() + TAG_LEN {
            return Err(self.corrupt());
        }
        let Some(ciphertext) = self.ciphertext.get_mut(..len) else {
            return Err(self.corrupt());
        };
        if let Err(e) = self.read.read_exact(ciphertext).await {
            return Err(self.read_error(e));
        }
        let opened = self
            .shared
            .transport
            .read_message(self.nonce, &self.ciphertext[..len], out);
        match opened {
            Ok(n) if n == out.len() => {
                self.nonce += 1;
                Ok(())
            }
            _ => Err(self.corrupt()),
        }
    }

    fn read_error(&self, e: io::Error) -> ChannelError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.io_error("connection ended inside a message".to_string())
        } else {
            self.io_error(e.to_string())
        }
    }

    fn corrupt(&self) -> ChannelError {
        ChannelError::Corrupt {
            peer: self.shared.peer.clone(),
        }
    }

    fn io_error(&self, reason: String) -> ChannelError {
        ChannelError::Io {
            peer: self.shared.peer.clone(),
            reason,
        }
    }
}

impl fmt::Debug for ChannelReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelReceiver")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
            .collect()
    }

    fn key_a() -> ClusterKey {
        ClusterKey::from_bytes(b"first cluster secret, 0123456789")
    }

    async fn listener(key: ClusterKey) -> (ChannelListener, String) {
        let listener = ChannelListener::bind("127.0.0.1:0", key, "host-a".to_string())
            .await
            .unwrap();
        let addr = listener.local_addr().to_string();
        (listener, addr)
    }

    /// A server on `server_key` and a client on `client_key`: both sides' handshake results.
    async fn pair(
        server_key: ClusterKey,
        client_key: ClusterKey,
    ) -> (Result<Channel, ChannelError>, Result<Channel, ChannelError>) {
        let (listener, addr) = listener(server_key).await;
        let server =
            tokio::spawn(async move { listener.accept().await.unwrap().handshake().await });
        let client = connect(&addr, &client_key, "host-b").await;
        (server.await.unwrap(), client)
    }

    const SIZES: [usize; 9] = [
        0,
        1,
        MAX_CHUNK - 1,
        MAX_CHUNK,
        MAX_CHUNK + 1,
        65535,
        200_000,
        WRITE_BATCH + 3,
        5 << 20,
    ];

    #[tokio::test]
    async fn round_trip_both_directions() {
        let (server, client) = pair(key_a(), key_a()).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        assert_eq!(server.peer(), "host-b");
        assert_eq!(client.peer(), "host-a");
        let echo = tokio::spawn(async move {
            for (i, size) in SIZES.into_iter().enumerate() {
                let got = server.recv().await.unwrap();
                assert_eq!(got.len(), size);
                assert!(got == pattern(size, i as u8), "size {size} altered");
                server.send(&pattern(size, 100 + i as u8)).await.unwrap();
            }
            // The client hangs up between messages.
            match server.recv().await {
                Err(ChannelError::Closed { peer }) => assert_eq!(peer, "host-b"),
                other => panic!("expected Closed, got {other:?}"),
            }
        });
        for (i, size) in SIZES.into_iter().enumerate() {
            client.send(&pattern(size, i as u8)).await.unwrap();
            let got = client.recv().await.unwrap();
            assert_eq!(got.len(), size);
            assert!(got == pattern(size, 100 + i as u8), "size {size} altered");
        }
        drop(client);
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn split_halves_work_from_different_tasks() {
        const COUNT: u32 = 1000;
        let (server, client) = pair(key_a(), key_a()).await;
        let (mut server_tx, mut server_rx) = server.unwrap().split();
        let (mut client_tx, mut client_rx) = client.unwrap().split();
        assert_eq!(server_rx.peer(), "host-b");
        assert_eq!(client_tx.peer(), "host-a");

        // The server echoes through a queue from its receiving task to its sending task.
        let (queue_tx, mut queue_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let server_in = tokio::spawn(async move {
            while let Ok(message) = server_rx.recv().await {
                queue_tx.send(message).await.unwrap();
            }
        });
        let server_out = tokio::spawn(async move {
            while let Some(message) = queue_rx.recv().await {
                server_tx.send(&message).await.unwrap();
            }
        });
        let message = |i: u32| {
            let mut m = i.to_be_bytes().to_vec();
            m.extend(pattern((i as usize * 37) % 3000, i as u8));
            m
        };
        let client_out = tokio::spawn(async move {
            for i in 0..COUNT {
                client_tx.send(&message(i)).await.unwrap();
            }
            client_tx
        });
        let client_in = tokio::spawn(async move {
            for i in 0..COUNT {
                assert_eq!(client_rx.recv().await.unwrap(), message(i));
            }
        });
        client_in.await.unwrap();
        let client_tx = client_out.await.unwrap();
        // Dropping our write half ends the server's reading, then its echo task.
        drop(client_tx);
        server_in.await.unwrap();
        server_out.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_key_is_refused_on_both_sides_without_showing_keys() {
        let secret_a: &[u8] = b"first cluster secret, 0123456789";
        let secret_b: &[u8] = b"other cluster secret, 9876543210";
        let (key_a, key_b) = (
            ClusterKey::from_bytes(secret_a),
            ClusterKey::from_bytes(secret_b),
        );
        let (server, client) = pair(key_a.clone(), key_b.clone()).await;
        let client = client.unwrap_err();
        let server = server.unwrap_err();
        assert!(matches!(client, ChannelError::Refused { .. }), "{client:?}");
        assert!(matches!(server, ChannelError::Refused { .. }), "{server:?}");
        let hex = |k: &ClusterKey| k.0.iter().map(|b| format!("{b:02x}")).collect::<String>();
        for error in [&client, &server] {
            let text = error.to_string();
            assert!(!text.contains('\n'), "{text}");
            for secret in [secret_a, secret_b] {
                assert!(!text.contains(std::str::from_utf8(secret).unwrap()));
            }
            for key in [&key_a, &key_b] {
                assert!(!text.contains(&hex(key)));
                assert!(!text.contains(&String::from_utf8_lossy(&key.0).into_owned()));
            }
        }
        assert!(client.to_string().contains("not the same cluster key"));
        assert_eq!(format!("{key_a:?}"), "ClusterKey(<redacted>)");
    }

    #[tokio::test]
    async fn other_protocol_version_is_refused() {
        let (listener, addr) = listener(key_a()).await;
        let server =
            tokio::spawn(async move { listener.accept().await.unwrap().handshake().await });
        let key = key_a();
        let mut noise = snow::Builder::new(NOISE_PARAMS.parse().unwrap())
            .prologue(b"viscsi migration channel v2")
            .psk(0, &key.0)
            .build_initiator()
            .unwrap();
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        write_handshake_message(&mut stream, &mut noise, "host-b")
            .await
            .ok()
            .unwrap();
        let error = server.await.unwrap().unwrap_err();
        assert!(matches!(error, ChannelError::Refused { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn garbage_fails_the_handshake() {
        let (listener, addr) = listener(key_a()).await;
        let mut plausible = vec![0u8, 64];
        plausible.extend(pattern(64, 7));
        let inputs: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: example\r\n\r\n".to_vec(),
            plausible,
            vec![0, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            vec![0xff],
        ];
        for input in inputs {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            stream.write_all(&input).await.unwrap();
            stream.shutdown().await.unwrap();
            let error = listener
                .accept()
                .await
                .unwrap()
                .handshake()
                .await
                .unwrap_err();
            assert!(matches!(error, ChannelError::Refused { .. }), "{error:?}");
        }
        // Connecting and leaving without a word is a probe, not a refusal.
        drop(TcpStream::connect(&addr).await.unwrap());
        let error = listener
            .accept()
            .await
            .unwrap()
            .handshake()
            .await
            .unwrap_err();
        assert!(matches!(error, ChannelError::Closed { .. }), "{error:?}");
        // The listener still serves agents.
        let server =
            tokio::spawn(async move { listener.accept().await.unwrap().handshake().await });
        let mut client = connect(&addr, &key_a(), "host-b").await.unwrap();
        let mut server = server.await.unwrap().unwrap();
        client.send(b"still here").await.unwrap();
        assert_eq!(server.recv().await.unwrap(), b"still here");
    }

    #[tokio::test]
    async fn garbage_answer_refuses_the_initiator() {
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = plain.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf).await;
            let mut answer = vec![0u8, 60];
            answer.extend(pattern(60, 3));
            let _ = stream.write_all(&answer).await;
            let _ = stream.read(&mut buf).await;
        });
        let error = connect(&addr, &key_a(), "host-b").await.unwrap_err();
        assert!(matches!(error, ChannelError::Refused { .. }), "{error:?}");
    }

    /// A relay from the client to `target` that flips one bit at byte `flip_at` of what the
    /// client sends.
    async fn flipping_relay(target: String, flip_at: usize) -> String {
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = relay.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (client, _) = relay.accept().await.unwrap();
            let server = TcpStream::connect(target).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            let mut seen = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if (seen..seen + n).contains(&flip_at) {
                    buf[flip_at - seen] ^= 0x01;
                }
                seen += n;
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn tampered_message_is_corrupt() {
        let handshake = 2 + DH_LEN + "host-b".len() + TAG_LEN;
        let header = 2 + HEADER_LEN + TAG_LEN;
        let offsets = [
            handshake,                                   // the header's length
            handshake + 7,                               // the header's ciphertext
            handshake + header,                          // the data's length
            handshake + header + 2 + 5,                  // the data's ciphertext
            handshake + header + 2 + 1000 + TAG_LEN - 1, // the data's tag
        ];
        for flip_at in offsets {
            let (listener, addr) = listener(key_a()).await;
            let server =
                tokio::spawn(async move { listener.accept().await.unwrap().handshake().await });
            let relay = flipping_relay(addr, flip_at).await;
            let mut client = connect(&relay, &key_a(), "host-b").await.unwrap();
            let mut server = server.await.unwrap().unwrap();
            client.send(&pattern(1000, 1)).await.unwrap();
            let error = server.recv().await.unwrap_err();
            assert!(
                matches!(error, ChannelError::Corrupt { .. }),
                "flip at {flip_at}: {error:?}"
            );
            // The channel stays failed.
            assert!(server.recv().await.is_err());
        }
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_corrupt() {
        let (server, client) = pair(key_a(), key_a()).await;
        let (mut server, client) = (server.unwrap(), client.unwrap());
        let (mut tx, _rx) = client.split();
        let mut filled = 0;
        let declared = u32::try_from(MAX_MESSAGE + 1).unwrap();
        tx.seal(&declared.to_be_bytes(), &mut filled).unwrap();
        tx.flush_buf(filled).await.unwrap();
        let error = server.recv().await.unwrap_err();
        assert!(matches!(error, ChannelError::Corrupt { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn recv_waiting_for_a_message_is_cancel_safe() {
        let (server, client) = pair(key_a(), key_a()).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        let waited = tokio::time::timeout(Duration::from_millis(20), server.recv()).await;
        assert!(waited.is_err());
        client.send(b"after the timeout").await.unwrap();
        assert_eq!(server.recv().await.unwrap(), b"after the timeout");
    }

    #[tokio::test]
    async fn connect_errors_name_the_address() {
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = unused.local_addr().unwrap().to_string();
        drop(unused);
        let error = connect(&addr, &key_a(), "host-b").await.unwrap_err();
        assert!(matches!(error, ChannelError::Connect { .. }), "{error:?}");
        assert!(error.to_string().contains(&addr));

        let long = "h".repeat(256);
        assert!(matches!(
            connect(&addr, &key_a(), &long).await,
            Err(ChannelError::Connect { .. })
        ));
        assert!(ChannelListener::bind("127.0.0.1:0", key_a(), long)
            .await
            .is_err());
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("viscsi-channel-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let short = dir.join("short");
        std::fs::write(&short, b"fifteen bytes..\n").unwrap();
        assert_eq!(
            ClusterKey::from_file(&short).unwrap_err(),
            format!(
                "cluster key file {}: too short (at least 16 bytes)",
                short.display()
            )
        );

        let ok = dir.join("ok");
        std::fs::write(&ok, b"sixteen bytes...\n").unwrap();
        let from_file = ClusterKey::from_file(&ok).unwrap();
        assert_eq!(from_file.0, ClusterKey::from_bytes(b"sixteen bytes...").0);
        assert_ne!(from_file.0, ClusterKey::from_bytes(b"sixteen bytes...\n").0);

        let missing = dir.join("missing");
        let error = ClusterKey::from_file(&missing).unwrap_err();
        assert!(error.starts_with(&format!("cluster key file {}: ", missing.display())));

        let generated = ClusterKey::generate_file_contents();
        assert_eq!(generated.len(), 65);
        assert!(generated.ends_with('\n'));
        assert!(generated[..64]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(generated, ClusterKey::generate_file_contents());
        let file = dir.join("generated");
        std::fs::write(&file, &generated).unwrap();
        assert!(ClusterKey::from_file(&file).is_ok());

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn halves_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Shared>();
        send::<Channel>();
        send::<ChannelSender>();
        send::<ChannelReceiver>();
        send::<Incoming>();
        send_sync::<ChannelListener>();
    }
}
