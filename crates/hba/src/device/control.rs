//! Connections to the adapter: the hello, then control requests (each answered by its own
//! task, so a slow login does not hold up heartbeats) or a VF queue.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tokio::io::Interest;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{queue, Device, CRASH_EXIT_CODE};
use crate::protocol::{
    write_message, ControlError, ControlReply, ControlRequest, Fault, FrameBuffer, FrameReader,
    Hello, Message, Reply, Request, MAGIC, PROTOCOL_VERSION,
};
use crate::shm::Region;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a portal probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest owner name.
const MAX_OWNER: usize = 255;

/// Serves one accepted connection until it closes.
pub(super) async fn serve_connection(device: Arc<Device>, stream: UnixStream) {
    let first = match tokio::time::timeout(HELLO_TIMEOUT, read_first(&stream)).await {
        Ok(Ok(first)) => first,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection failed before its hello");
            return;
        }
        Err(_) => {
            tracing::warn!("no hello within {HELLO_TIMEOUT:?}; connection dropped");
            return;
        }
    };
    let (bytes, fd) = first;
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::with_buffer(r, bytes);
    let (id, hello) = match tokio::time::timeout(HELLO_TIMEOUT, reader.next_message()).await {
        Ok(Ok(Some(Message::Request(ControlRequest {
            id,
            request: Request::Hello(hello),
        })))) => (id, hello),
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            tracing::warn!(
                "connection did not start with a hello ({}); dropped",
                other.name()
            );
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "bad first frame; connection dropped");
            return;
        }
        Err(_) => {
            tracing::warn!("no hello within {HELLO_TIMEOUT:?}; connection dropped");
            return;
        }
    };
    if let Err(e) = check_hello(&hello) {
        tracing::warn!(client = %hello.client, error = %e, "hello refused");
        let _ = reply(&mut w, id, Err(e)).await;
        return;
    }
    let hello_ok = |shm: bool| {
        Ok(Reply::Hello {
            protocol: PROTOCOL_VERSION,
            adapter: device.summary(),
            shm,
        })
    };
    match hello.queue {
        Some(vf) => {
            crate::protocol::size_queue_socket(w.as_ref());
            // A hung adapter does not bring up queues.
            device.wait_not_hung().await;
            let shm = match (hello.shm, fd) {
                (Some(size), Some(fd)) => match Region::map_writable(fd, size) {
                    Ok(region) => Some(region),
                    Err(e) => {
                        tracing::warn!(vf, error = %e, "shared memory refused; data-in goes through the socket");
                        None
                    }
                },
                _ => None,
            };
            let took_shm = shm.is_some();
            match queue::attach(&device, vf, shm) {
                Ok(attached) => {
                    tracing::debug!(vf, client = %hello.client, shm = took_shm, "queue open");
                    if reply(&mut w, id, hello_ok(took_shm)).await.is_err() {
                        attached.detach();
                        return;
                    }
                    attached.run(reader, w).await;
                }
                Err(e) => {
                    let _ = reply(&mut w, id, Err(e)).await;
                }
            }
        }
        None => {
            // The hello is answered even while hung, so that `recover` can get through.
            if reply(&mut w, id, hello_ok(false)).await.is_ok() {
                tracing::debug!(client = %hello.client, "control connection");
                serve_control(device, reader, w).await;
            }
        }
    }
}

/// The first bytes of a connection, and a file descriptor passed with them (a queue's
/// shared memory); any further descriptors are closed.
async fn read_first(stream: &UnixStream) -> io::Result<(BytesMut, Option<OwnedFd>)> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        stream.readable().await?;
        let received = stream.try_io(Interest::READABLE, || {
            let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let r = rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
            let mut fd = None;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    for f in fds {
                        fd.get_or_insert(f);
                    }
                }
            }
            Ok((r.bytes, fd))
        });
        match received {
            Ok((n, fd)) => return Ok((BytesMut::from(&buf[..n]), fd)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn check_hello(hello: &Hello) -> Result<(), ControlError> {
    if hello.magic != MAGIC {
        return Err(ControlError::Version(format!(
            "not a viscsi adapter hello (magic {:?})",
            hello.magic
        )));
    }
    if hello.protocol != PROTOCOL_VERSION {
        return Err(ControlError::Version(format!(
            "the adapter speaks protocol version {PROTOCOL_VERSION}, the driver {}",
            hello.protocol
        )));
    }
    Ok(())
}

async fn reply(
    w: &mut OwnedWriteHalf,
    id: u64,
    result: Result<Reply, ControlError>,
) -> std::io::Result<()> {
    write_message(w, &Message::Reply(ControlReply { id, result })).await
}

/// A message for the control connection's writer.
struct Outgoing {
    message: Message,
    /// The `crash` fault: exit once this is written.
    then_crash: bool,
}

async fn serve_control(
    device: Arc<Device>,
    mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    w: OwnedWriteHalf,
) {
    let connection = device.connection_id();
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(write_loop(rx, w));
    let events = {
        let device = device.clone();
        let tx = tx.clone();
        let mut events = device.events.subscribe();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                device.wait_not_hung().await;
                let message = Message::Event(event);
                if tx
                    .send(Outgoing {
                        message,
                        then_crash: false,
                    })
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    let mut handlers = JoinSet::new();
    loop {
        while handlers.try_join_next().is_some() {}
        let request = match reader.next_message().await {
            Ok(Some(Message::Request(r))) => r,
            Ok(Some(other)) => {
                tracing::warn!(
                    connection,
                    "unexpected message on a control connection ({}); dropped",
                    other.name()
                );
                break;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(connection, error = %e, "bad control frame; connection dropped");
                break;
            }
        };
        let ControlRequest { id, request } = request;
        if let Request::Fault { fault } = request {
            // Faults are taken even while hung (that is how `recover` works).
            device.inject(fault);
            let message = Message::Reply(ControlReply {
                id,
                result: Ok(Reply::Done),
            });
            let _ = tx.send(Outgoing {
                message,
                then_crash: fault == Fault::Crash,
            });
            continue;
        }
        let device = device.clone();
        let tx = tx.clone();
        handlers.spawn(async move {
            device.wait_not_hung().await;
            let result = handle(&device, connection, request).await;
            let message = Message::Reply(ControlReply { id, result });
            let _ = tx.send(Outgoing {
                message,
                then_crash: false,
            });
        });
    }
    handlers.abort_all();
    events.abort();
    // A hung adapter notices nothing; the VFs go when it recovers.
    device.wait_not_hung().await;
    device.release_owned_by(connection).await;
    drop(tx);
    let _ = writer.await;
}

async fn handle(
    device: &Arc<Device>,
    connection: u64,
    request: Request,
) -> Result<Reply, ControlError> {
    match request {
        Request::Hello(_) => Err(ControlError::Refused("hello was already said".into())),
        Request::Info => Ok(Reply::Info(device.summary())),
        Request::Status => Ok(Reply::Status(device.status())),
        Request::AllocVf { owner } => {
            if owner.len() > MAX_OWNER {
                return Err(ControlError::Refused("owner name too long".into()));
            }
            device
                .alloc_vf(connection, owner)
                .map(|vf| Reply::Vf { vf })
        }
        Request::ProgramVf { vf, client } => device
            .program_vf(connection, vf, *client)
            .await
            .map(Reply::Programmed),
        Request::ReleaseVf { vf } => device
            .release_vf(connection, vf)
            .await
            .map(|()| Reply::Done),
        Request::Probe { portal } => {
            let reachable = device.is_link_up()
                && datapath::software::tcp_reaches(&portal, PROBE_TIMEOUT).await
                && device.is_link_up();
            Ok(Reply::Probe { reachable })
        }
        Request::Ping { seq } => Ok(Reply::Pong {
            seq,
            vfs_in_use: device.vfs_in_use(),
            link_up: device.is_link_up(),
        }),
        Request::Fault { .. } => Err(ControlError::Refused("fault handled elsewhere".into())),
    }
}

async fn write_loop(mut rx: mpsc::UnboundedReceiver<Outgoing>, mut w: OwnedWriteHalf) {
    let mut buf = FrameBuffer::default();
    while let Some(first) = rx.recv().await {
        let mut crash = first.then_crash;
        buf.queue(&first.message);
        while let Ok(more) = rx.try_recv() {
            crash |= more.then_crash;
            buf.queue(&more.message);
        }
        let written = buf.write_to(&mut w).await;
        if crash {
            tracing::error!("crash fault: exiting with code {CRASH_EXIT_CODE}");
            std::process::exit(CRASH_EXIT_CODE);
        }
        if written.is_err() {
            return;
        }
    }
}
