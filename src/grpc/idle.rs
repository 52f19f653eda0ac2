//! Connections whose peer has gone quiet are closed.
//!
//! HTTP/2 keepalive (a PING every [`KEEPALIVE_INTERVAL`], answered within
//! [`KEEPALIVE_TIMEOUT`]) finds dead peers, but only once a connection speaks
//! HTTP/2: a TCP connection that never sends its preface, or an HTTP/1 one
//! left open between requests, would be held forever. So every accepted
//! connection is watched: one that sends no byte within the handshake
//! timeout, or none for the idle timeout afterwards, fails its next read,
//! which closes it. A live HTTP/2 client always answers the keepalive PING,
//! so its connection is never idle for longer than the ping interval.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// How often the server PINGs a peer it has not heard from.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long the server waits for the PING's answer before closing.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a connection may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct Quiet {
    /// Before its first byte.
    pub handshake: Duration,
    /// Between two reads afterwards.
    pub idle: Duration,
}

/// A connection that fails its reads once its peer has been silent too long.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    quiet: Quiet,
    silent_until: Pin<Box<Sleep>>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, quiet: Quiet) -> Self {
        Self {
            inner,
            quiet,
            silent_until: Box::pin(tokio::time::sleep(quiet.handshake)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let next = Instant::now() + self.quiet.idle;
                self.silent_until.as_mut().reset(next);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // The sleep wakes this task, so the deadline is noticed even
                // though the socket stays silent.
                ready!(self.silent_until.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing for too long",
                )))
            }
            done => done,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Watched<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
