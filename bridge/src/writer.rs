//! A link's socket writer: a task that writes what the link hands it, coalescing what is
//! queued into one write, and counts what it has not written yet. Links stop taking messages
//! from their local queue while [`Unwritten::is_full`]: a message settled when handed to the
//! writer (MQTT QoS 0, a shovel's `on-publish` and `no-ack`) must not pull the whole backlog
//! into memory when the remote reads slowly or not at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// The most a link hands to its writer ahead of the socket (one message may go past it).
pub const MAX_UNWRITTEN: usize = 1 << 20;

/// Bytes handed to the writer task and not yet written to the socket.
#[derive(Debug, Default)]
pub struct Unwritten {
    bytes: AtomicUsize,
    /// Woken after each write.
    drained: Notify,
}

impl Unwritten {
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
    pub fn is_full(&self) -> bool {
        self.bytes() >= MAX_UNWRITTEN
    }
    /// Whether the writer's backlog plus `pending` (encoded, not handed over yet) is full.
    pub fn is_full_with(&self, pending: &BytesMut) -> bool {
        self.bytes() + pending.len() >= MAX_UNWRITTEN
    }
    /// Resolves after the next write (at once if one happened since the last call).
    pub async fn drained(&self) {
        self.drained.notified().await
    }
}

/// The link's end of the writer task: what it sends is counted in [`Unwritten`].
#[derive(Debug)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Bytes>,
    unwritten: Arc<Unwritten>,
}

impl Writer {
    pub fn send(&self, bytes: Bytes) -> Result<(), mpsc::error::SendError<Bytes>> {
        self.unwritten.bytes.fetch_add(bytes.len(), Ordering::AcqRel);
        self.tx.send(bytes)
    }
}

/// Starts the writer task on `writer`; it ends with an error from the socket, or once the
/// [`Writer`] is dropped and everything is written (then it shuts the socket's write side).
pub fn spawn<W: AsyncWrite + Unpin + Send + 'static>(
    writer: W,
) -> (Writer, Arc<Unwritten>, JoinHandle<std::io::Result<()>>) {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let unwritten = Arc::new(Unwritten::default());
    let task = tokio::spawn(write_loop(writer, rx, unwritten.clone()));
    (Writer { tx, unwritten: unwritten.clone() }, unwritten, task)
}

async fn write_loop(
    mut writer: impl AsyncWrite + Unpin,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    unwritten: Arc<Unwritten>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        buf.extend_from_slice(&first);
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(&more);
        }
        writer.write_all(&buf).await?;
        unwritten.bytes.fetch_sub(buf.len(), Ordering::AcqRel);
        unwritten.drained.notify_one();
        buf.clear();
    }
    let _ = writer.shutdown().await;
    Ok(())
}
