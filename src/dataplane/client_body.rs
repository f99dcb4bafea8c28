//! The client's request body on its way to a backend, watched so that a failure it causes is
//! blamed on the client and never on the backend.
//!
//! A malformed chunk, a body shorter than its `Content-Length` or one that stops arriving
//! makes the upstream request fail too; hyper then reports a backend error. The proxy asks
//! this watch instead: whose fault was it (RFC 9110 §15.5.1 400, §15.5.9 408)?

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;

/// What the client's body did last, as the upstream connection saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    /// Frames are flowing, or the body has not been asked for yet.
    Flowing = 0,
    /// The upstream side asked for more and the client has not sent it yet.
    AwaitingClient = 1,
    /// Every byte arrived.
    Complete = 2,
    /// The client sent something that is not a valid body, or closed before its end.
    Malformed = 3,
    /// The body grew past `limits.max_body_bytes`.
    TooLarge = 4,
}

impl BodyState {
    fn from_u8(v: u8) -> BodyState {
        match v {
            1 => BodyState::AwaitingClient,
            2 => BodyState::Complete,
            3 => BodyState::Malformed,
            4 => BodyState::TooLarge,
            _ => BodyState::Flowing,
        }
    }
}

/// Shared between the body (moved into the upstream request) and the proxy, which reads it
/// once the upstream request has failed.
#[derive(Debug, Clone, Default)]
pub struct BodyWatch(Arc<AtomicU8>);

impl BodyWatch {
    pub fn state(&self) -> BodyState {
        BodyState::from_u8(self.0.load(Ordering::Acquire))
    }

    fn set(&self, state: BodyState) {
        // A fault, once seen, stays: later polls must not hide it.
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (old < BodyState::Malformed as u8).then_some(state as u8)
            });
    }
}

/// The client's streamed body, cut at `max` bytes, reporting into a [`BodyWatch`].
pub struct ClientBody {
    inner: Limited<Incoming>,
    watch: BodyWatch,
}

impl ClientBody {
    pub fn new(body: Incoming, max: usize) -> (ClientBody, BodyWatch) {
        let watch = BodyWatch::default();
        let body = ClientBody {
            inner: Limited::new(body, max),
            watch: watch.clone(),
        };
        (body, watch)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => this.watch.set(BodyState::AwaitingClient),
            Poll::Ready(Some(Ok(_))) => this.watch.set(BodyState::Flowing),
            Poll::Ready(None) => this.watch.set(BodyState::Complete),
            Poll::Ready(Some(Err(e))) => this.watch.set(if e.is::<LengthLimitError>() {
                BodyState::TooLarge
            } else {
                BodyState::Malformed
            }),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_not_overwritten_by_later_polls() {
        let watch = BodyWatch::default();
        watch.set(BodyState::AwaitingClient);
        assert_eq!(watch.state(), BodyState::AwaitingClient);
        watch.set(BodyState::Malformed);
        watch.set(BodyState::Flowing);
        watch.set(BodyState::Complete);
        assert_eq!(watch.state(), BodyState::Malformed);
    }
}
