//! Request-head guard for client HTTP/1 connections: watches the raw bytes hyper reads and flags
//! request-smuggling shapes (TE+CL, duplicate CL) and oversized heads that hyper would otherwise
//! normalise or answer itself, so the service can refuse them with its own response.
//!
//! It also notes when a head has started to arrive but not finished, which is what the
//! listener's header-read timeout (slowloris) measures: hyper's own timer also runs while a
//! keep-alive connection merely waits for its next request, so it would cap the idle
//! keep-alive time at `header_read`.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Why a request head must be refused rather than forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadViolation {
    /// `Transfer-Encoding` and `Content-Length` on the same request; hyper drops the CL.
    TeAndContentLength,
    /// More than one `Content-Length` value; hyper keeps one if they agree.
    DuplicateContentLength,
    /// The head grew past the configured limit before its terminating empty line.
    HeadTooLarge,
}

impl HeadViolation {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TeAndContentLength => "te_and_content_length",
            Self::DuplicateContentLength => "duplicate_content_length",
            Self::HeadTooLarge => "head_too_large",
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            Self::TeAndContentLength => "request carries both Transfer-Encoding and Content-Length",
            Self::DuplicateContentLength => "request carries more than one Content-Length",
            Self::HeadTooLarge => "request head exceeds the size limit",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Self::TeAndContentLength | Self::DuplicateContentLength => 400,
            Self::HeadTooLarge => 431,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::TeAndContentLength => 1,
            Self::DuplicateContentLength => 2,
            Self::HeadTooLarge => 3,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::TeAndContentLength),
            2 => Some(Self::DuplicateContentLength),
            3 => Some(Self::HeadTooLarge),
            _ => None,
        }
    }
}

impl fmt::Display for HeadViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

const NO_BAD_HEAD: u64 = u64::MAX;

#[derive(Debug)]
struct Shared {
    /// Ordinal of the first flagged head. Written at most once, after `kind`.
    first_bad: AtomicU64,
    kind: AtomicU8,
    /// Requests the service has asked about so far.
    served: AtomicU64,
    /// Origin of `head_started_us`.
    epoch: Instant,
    /// Microseconds after `epoch` plus one at which the head being read began to arrive;
    /// 0 while no head is partly read.
    head_started_us: AtomicU64,
    /// Woken when a head starts to arrive, so a timer waiting on idleness can switch to the
    /// header-read deadline.
    head_started: Notify,
}

impl Shared {
    fn record(&self, ordinal: u64, violation: HeadViolation) {
        self.kind.store(violation.to_u8(), Ordering::Relaxed);
        // Release pairs with the Acquire in `check_next`, so `kind` is visible once this is.
        self.first_bad.store(ordinal, Ordering::Release);
    }
}

/// Shared between the IO wrapper and the per-connection service. Cheap: atomics only.
#[derive(Debug, Clone)]
pub struct HeadVerdicts {
    shared: Arc<Shared>,
}

impl HeadVerdicts {
    /// Called by the service once per request, in order (hyper's h1 server handles one request
    /// at a time per connection, in order).
    /// Returns `Some(violation)` if the head with this ordinal (0-based count of requests on this
    /// connection) or any earlier one was flagged.
    pub fn check_next(&self) -> Option<HeadViolation> {
        // hyper only dispatches a request after poll_read returned its whole head, and the
        // scan runs inside that poll_read, so the verdict for this ordinal is already stored.
        let ordinal = self.shared.served.fetch_add(1, Ordering::Relaxed);
        if self.shared.first_bad.load(Ordering::Acquire) <= ordinal {
            HeadViolation::from_u8(self.shared.kind.load(Ordering::Relaxed))
        } else {
            None
        }
    }

    /// When the HTTP/1 head now being read began to arrive, if one is partly read. Heads
    /// that arrive whole in one read never show here; neither does anything once the
    /// connection is no longer followed (HTTP/2, an upgrade, a refused head).
    pub fn head_pending_since(&self) -> Option<Instant> {
        match self.shared.head_started_us.load(Ordering::Acquire) {
            0 => None,
            us => self.shared.epoch.checked_add(Duration::from_micros(us - 1)),
        }
    }

    /// Resolves after a head starts to arrive (or at once if that happened since the last
    /// call); check `head_pending_since` afterwards.
    pub async fn head_started(&self) {
        self.shared.head_started.notified().await;
    }
}

/// Client stream wrapper: reads pass through byte-for-byte while being scanned for request
/// framing; writes are untouched.
pub struct GuardedIo<T> {
    inner: T,
    scanner: Scanner,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, max_head_bytes: usize) -> (Self, HeadVerdicts) {
        let shared = Arc::new(Shared {
            first_bad: AtomicU64::new(NO_BAD_HEAD),
            kind: AtomicU8::new(0),
            served: AtomicU64::new(0),
            epoch: Instant::now(),
            head_started_us: AtomicU64::new(0),
            head_started: Notify::new(),
        });
        let verdicts = HeadVerdicts {
            shared: Arc::clone(&shared),
        };
        let scanner = Scanner {
            state: State::Head,
            head: Vec::new(),
            max_head: max_head_bytes,
            ordinal: 0,
            shared,
        };
        (Self { inner, scanner }, verdicts)
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            this.scanner.feed(&buf.filled()[before..]);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's header limit is configurable; this only sizes the common-case stack array, and a
/// head with more headers is re-parsed with a heap array rather than given up on.
const STACK_HEADERS: usize = 128;
/// Smallest possible header line is `a:\n`.
const MIN_HEADER_LINE: usize = 3;
/// Head-buffer capacity kept across requests; anything above is returned to the allocator so
/// one large head doesn't pin memory on an idle keep-alive connection.
const RETAINED_HEAD_CAPACITY: usize = 4096;
const H2_PRIOR_KNOWLEDGE: &[u8] = b"PRI * HTTP/2.0";

enum State {
    /// Accumulating a request head (bytes kept in `Scanner::head`).
    Head,
    /// Skipping a Content-Length body: bytes still expected.
    Fixed(u64),
    Chunked(Chunked),
    /// Something we can't follow, or a verdict that ends the connection: bytes are no longer
    /// looked at.
    Passthrough,
}

struct Scanner {
    state: State,
    head: Vec<u8>,
    max_head: usize,
    /// Ordinal of the head currently being read.
    ordinal: u64,
    shared: Arc<Shared>,
}

impl Scanner {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let used = match &mut self.state {
                State::Passthrough => return,
                State::Head => self.feed_head(data),
                State::Fixed(remaining) => {
                    let n = (*remaining).min(data.len() as u64);
                    *remaining -= n;
                    if *remaining == 0 {
                        self.state = State::Head;
                    }
                    // n <= data.len(), so this cannot truncate.
                    n as usize
                }
                State::Chunked(chunked) => {
                    let (used, progress) = chunked.feed(data);
                    match progress {
                        ChunkProgress::More => {}
                        ChunkProgress::Finished => self.state = State::Head,
                        ChunkProgress::Invalid => self.stop(),
                    }
                    used
                }
            };
            data = &data[used..];
        }
    }

    fn stop(&mut self) {
        self.state = State::Passthrough;
        self.head = Vec::new();
        self.head_done();
    }

    /// Only the slow path gets here (a head split over reads), so the clock read is rare.
    fn head_begun(&self) {
        let us = self
            .shared
            .epoch
            .elapsed()
            .as_micros()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.shared.head_started_us.store(us + 1, Ordering::Release);
        self.shared.head_started.notify_one();
    }

    fn head_done(&self) {
        self.shared.head_started_us.store(0, Ordering::Release);
    }

    /// Returns how many bytes of `data` belong to the head (or were skipped before it).
    fn feed_head(&mut self, data: &[u8]) -> usize {
        if !self.head.is_empty() {
            return self.feed_buffered_head(data);
        }
        // httparse skips empty lines before the request line, and so does hyper.
        let skipped = data
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(data.len());
        let rest = &data[skipped..];
        let Some(&first) = rest.first() else {
            return skipped;
        };
        // Not a method token: hyper will reject it, or it is tunnelled binary after an
        // upgrade (WebSocket frames, TLS). Either way there is nothing left to guard.
        if !is_tchar(first) {
            self.stop();
            return data.len();
        }
        // Fast path: the whole head usually arrives in one read, so parse it in place.
        let window = &rest[..rest.len().min(self.max_head)];
        if let Some(end) = find_head_end(window, 0) {
            self.finish_head(&rest[..end]);
            return skipped + end;
        }
        if window.len() >= self.max_head {
            self.too_large();
            return data.len();
        }
        self.head_begun();
        self.append_head(window);
        skipped + window.len()
    }

    fn feed_buffered_head(&mut self, data: &[u8]) -> usize {
        let old = self.head.len();
        let take = data.len().min(self.max_head - old);
        self.append_head(&data[..take]);
        if let Some(end) = find_head_end(&self.head, old) {
            let mut head = std::mem::take(&mut self.head);
            self.finish_head(&head[..end]);
            if matches!(self.state, State::Passthrough) {
                return data.len();
            }
            head.clear();
            head.shrink_to(RETAINED_HEAD_CAPACITY);
            self.head = head;
            return end - old;
        }
        if self.head.len() >= self.max_head {
            self.too_large();
            return data.len();
        }
        take
    }

    /// Grows geometrically for amortised byte-at-a-time arrival, but never past `max_head`.
    fn append_head(&mut self, bytes: &[u8]) {
        let needed = self.head.len() + bytes.len();
        if needed > self.head.capacity() {
            let target = needed
                .max(self.head.capacity() * 2)
                .max(256)
                .min(self.max_head);
            self.head.reserve_exact(target - self.head.len());
        }
        self.head.extend_from_slice(bytes);
    }

    fn too_large(&mut self) {
        self.shared
            .record(self.ordinal, HeadViolation::HeadTooLarge);
        self.stop();
    }

    fn finish_head(&mut self, head: &[u8]) {
        self.head_done();
        let ordinal = self.ordinal;
        self.ordinal += 1;
        match judge_head(head) {
            Judgement::NoBody => self.state = State::Head,
            Judgement::Fixed(n) => self.state = State::Fixed(n),
            Judgement::Chunked => self.state = State::Chunked(Chunked::default()),
            Judgement::Violation(v) => {
                // The proxy answers with Connection: close, so later heads never matter.
                self.shared.record(ordinal, v);
                self.stop();
            }
            Judgement::Unfollowable => self.stop(),
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Position just past the first empty line, looking only at line feeds at or after `from`
/// (earlier ones were already ruled out). Bare-LF line endings count, as they do for httparse.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &buf[from..])
        .map(|i| from + i)
        .find(|&i| {
            (i >= 1 && buf[i - 1] == b'\n')
                || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n')
        })
        .map(|i| i + 1)
}

enum Judgement {
    NoBody,
    Fixed(u64),
    Chunked,
    Violation(HeadViolation),
    /// hyper will refuse this head itself (or it isn't HTTP/1 at all).
    Unfollowable,
}

fn judge_head(head: &[u8]) -> Judgement {
    // h2c prior knowledge: hyper-util's auto builder serves h2 on the same listener.
    if head.starts_with(H2_PRIOR_KNOWLEDGE) {
        return Judgement::Unfollowable;
    }
    // Accept at least everything hyper can be configured to accept; the leniencies only turn
    // errors into parses, so they never change how an otherwise-valid head is read.
    let mut config = httparse::ParserConfig::default();
    config
        .allow_multiple_spaces_in_request_line_delimiters(true)
        .ignore_invalid_headers_in_requests(true);

    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut stack);
    match config.parse_request(&mut req, head) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => framing(req.headers),
        Err(httparse::Error::TooManyHeaders) => {
            let mut heap = vec![httparse::EMPTY_HEADER; head.len() / MIN_HEADER_LINE + 1];
            let mut req = httparse::Request::new(&mut heap);
            match config.parse_request(&mut req, head) {
                Ok(httparse::Status::Complete(len)) if len == head.len() => framing(req.headers),
                _ => Judgement::Unfollowable,
            }
        }
        _ => Judgement::Unfollowable,
    }
}

/// Mirrors hyper's server-side body rules (hyper 1.x `role::Server::parse`), except that the
/// shapes hyper would quietly repair are reported instead.
fn framing(headers: &[httparse::Header<'_>]) -> Judgement {
    let mut te_chunked: Option<bool> = None;
    let mut cl_values = 0usize;
    let mut cl: Option<u64> = None;
    let mut cl_invalid = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last Transfer-Encoding line decides, as in hyper.
            te_chunked = Some(is_chunked(h.value));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|&b| b == b',') {
                cl_values += 1;
                match parse_digits(trim_ows(part)) {
                    Some(n) => cl = Some(n),
                    None => cl_invalid = true,
                }
            }
        }
    }
    if te_chunked.is_some() && cl_values > 0 {
        return Judgement::Violation(HeadViolation::TeAndContentLength);
    }
    if cl_values > 1 {
        return Judgement::Violation(HeadViolation::DuplicateContentLength);
    }
    match (te_chunked, cl) {
        (Some(true), _) => Judgement::Chunked,
        // hyper rejects a request whose final coding isn't chunked.
        (Some(false), _) => Judgement::Unfollowable,
        _ if cl_invalid => Judgement::Unfollowable,
        (None, Some(0)) | (None, None) => Judgement::NoBody,
        (None, Some(n)) => Judgement::Fixed(n),
    }
}

/// hyper's `is_chunked_`: the value must be a visible-ASCII string whose last coding is chunked.
fn is_chunked(value: &[u8]) -> bool {
    let visible = value
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f && b < 0x80) || b == b'\t');
    visible
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| trim_ows(last).eq_ignore_ascii_case(b"chunked"))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Same acceptance as hyper's `from_digits`: no sign, no whitespace, no overflow.
fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Chunked-body position; mirrors hyper's `ChunkedState` byte for byte so both sides agree on
/// where the next head starts, including its strict CRLF and trailer rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkStep {
    #[default]
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

#[derive(Default)]
struct Chunked {
    step: ChunkStep,
    /// Hex size while reading the size line, then data bytes still to skip.
    size: u64,
}

enum ChunkProgress {
    More,
    Finished,
    /// hyper fails the body here and the connection with it.
    Invalid,
}

fn hex_value(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

impl Chunked {
    fn feed(&mut self, data: &[u8]) -> (usize, ChunkProgress) {
        use ChunkStep::*;
        let mut i = 0;
        while i < data.len() {
            // Bulk steps: the only ones that can span many bytes.
            match self.step {
                Data => {
                    let n = self.size.min((data.len() - i) as u64);
                    self.size -= n;
                    i += n as usize;
                    if self.size == 0 {
                        self.step = DataCr;
                    }
                    continue;
                }
                Extension => match memchr::memchr2(b'\r', b'\n', &data[i..]) {
                    Some(off) => i += off,
                    None => return (data.len(), ChunkProgress::More),
                },
                Trailer => match memchr::memchr(b'\r', &data[i..]) {
                    Some(off) => i += off,
                    None => return (data.len(), ChunkProgress::More),
                },
                _ => {}
            }
            let b = data[i];
            i += 1;
            self.step = match (self.step, b) {
                (Start, _) => match hex_value(b) {
                    Some(v) => {
                        self.size = v;
                        Size
                    }
                    None => return (i, ChunkProgress::Invalid),
                },
                (Size, b' ' | b'\t') | (SizeLws, b' ' | b'\t') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws | Extension, b'\r') => SizeLf,
                (Size, _) => {
                    match hex_value(b).and_then(|v| self.size.checked_mul(16)?.checked_add(v)) {
                        Some(size) => {
                            self.size = size;
                            Size
                        }
                        None => return (i, ChunkProgress::Invalid),
                    }
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Start,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => EndCr,
                (EndCr, b'\r') => EndLf,
                (EndCr, _) => Trailer,
                (EndLf, b'\n') => return (i, ChunkProgress::Finished),
                _ => return (i, ChunkProgress::Invalid),
            };
        }
        (i, ChunkProgress::More)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::task::Waker;

    /// Yields the input in the given pieces, one per poll_read.
    struct Pieces(VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    fn read_all<R: AsyncRead + Unpin>(mut r: R) -> (R, Vec<u8>) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        let mut storage = [0u8; 8192];
        loop {
            let mut rb = ReadBuf::new(&mut storage);
            match Pin::new(&mut r).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return (r, out),
                Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
                other => panic!("unexpected poll result {other:?}"),
            }
        }
    }

    fn run(pieces: Vec<Vec<u8>>, max: usize, asks: usize) -> Vec<Option<HeadViolation>> {
        let input: Vec<u8> = pieces.concat();
        let (io, verdicts) = GuardedIo::new(Pieces(pieces.into()), max);
        let (io, out) = read_all(io);
        assert_eq!(out, input, "bytes must pass through unchanged");
        assert!(io.scanner.head.capacity() <= max.max(1));
        (0..asks).map(|_| verdicts.check_next()).collect()
    }

    /// Verdicts for `input`, asserting they don't depend on how reads split it.
    fn verdicts(input: &[u8], max: usize, asks: usize) -> Vec<Option<HeadViolation>> {
        let whole = run(vec![input.to_vec()], max, asks);
        let bytewise = run(input.iter().map(|&b| vec![b]).collect(), max, asks);
        assert_eq!(whole, bytewise, "byte-by-byte reads changed the verdicts");
        let mut seed = 0x9e37_79b9_u32;
        let mut ragged = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let n = ((seed >> 24) as usize % 17 + 1).min(rest.len());
            ragged.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        assert_eq!(
            whole,
            run(ragged, max, asks),
            "ragged reads changed the verdicts"
        );
        whole
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    use HeadViolation::*;

    #[test]
    fn clean_get() {
        assert_eq!(verdicts(GET, 8192, 2), vec![None, None]);
    }

    #[test]
    fn keep_alive_sequence_flags_only_the_third() {
        let mut input = Vec::new();
        input.extend_from_slice(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
        input.extend_from_slice(
            b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              5;name=value;x=\"y\"\r\nhello\r\n\
              A \t; ext\r\n0123456789\r\n\
              0;last\r\nX-Trailer: 1\r\nOther: two\r\n\r\n",
        );
        input.extend_from_slice(
            b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        assert_eq!(
            verdicts(&input, 8192, 4),
            vec![
                None,
                None,
                Some(TeAndContentLength),
                Some(TeAndContentLength)
            ]
        );
    }

    #[test]
    fn te_and_cl_in_either_order() {
        let te_first =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
        let cl_first =
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: CHUNKED\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts(te_first, 8192, 1), vec![Some(TeAndContentLength)]);
        assert_eq!(verdicts(cl_first, 8192, 1), vec![Some(TeAndContentLength)]);
    }

    #[test]
    fn duplicate_content_length() {
        let lines = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
        let list = b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello";
        assert_eq!(verdicts(lines, 8192, 1), vec![Some(DuplicateContentLength)]);
        assert_eq!(verdicts(list, 8192, 1), vec![Some(DuplicateContentLength)]);
    }

    #[test]
    fn oversized_head() {
        let mut big = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(big.len() + 300, b'p');
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(verdicts(&big, 128, 1), vec![Some(HeadTooLarge)]);
        // A head of exactly the limit is fine; one byte more is not.
        assert_eq!(verdicts(&big, big.len(), 1), vec![None]);
        assert_eq!(verdicts(&big, big.len() - 1, 1), vec![Some(HeadTooLarge)]);
        // Never completes: flagged once the limit is passed, buffer stays bounded.
        assert_eq!(
            verdicts(&vec![b'A'; 100_000], 4096, 1),
            vec![Some(HeadTooLarge)]
        );
        // Only the oversized second head is flagged.
        let two = [GET, big.as_slice()].concat();
        assert_eq!(verdicts(&two, 128, 2), vec![None, Some(HeadTooLarge)]);
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let input = [b"\r\n\r\n\n".as_slice(), GET, b"\r\n", GET].concat();
        assert_eq!(verdicts(&input, 8192, 2), vec![None, None]);
    }

    #[test]
    fn smuggling_text_inside_bodies_is_not_a_head() {
        let payload = b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n";
        let mut input = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            payload.len()
        )
        .into_bytes();
        input.extend_from_slice(payload);
        input.extend_from_slice(
            format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                payload.len()
            )
            .as_bytes(),
        );
        input.extend_from_slice(payload);
        input.extend_from_slice(b"\r\n0\r\n\r\n");
        input.extend_from_slice(GET);
        assert_eq!(verdicts(&input, 8192, 3), vec![None, None, None]);
    }

    #[test]
    fn large_body_is_counted_not_buffered() {
        let body_len = 4 * 1024 * 1024;
        let mut input =
            format!("PUT / HTTP/1.1\r\nContent-Length: {body_len}\r\n\r\n").into_bytes();
        input.resize(input.len() + body_len, b'\n');
        input.extend_from_slice(GET);
        assert_eq!(run(vec![input], 1024, 2), vec![None, None]);
    }

    #[test]
    fn h2_prior_knowledge_is_passed_through() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend_from_slice(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
        );
        assert_eq!(verdicts(&input, 8192, 2), vec![None, None]);
    }

    #[test]
    fn upgrade_then_binary_has_no_false_flags() {
        let mut input = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n\
                          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .to_vec();
        let mut seed = 7u32;
        input.push(0x82);
        for _ in 0..5000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            input.push((seed >> 16) as u8);
        }
        input.extend_from_slice(
            b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        );
        assert_eq!(verdicts(&input, 8192, 3), vec![None, None, None]);
    }

    #[test]
    fn declined_upgrade_keeps_guarding() {
        // hyper keeps the connection in HTTP/1 when the service doesn't answer 101, so the
        // next request must still be judged.
        let input = [
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".as_slice(),
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]
        .concat();
        assert_eq!(
            verdicts(&input, 8192, 2),
            vec![None, Some(TeAndContentLength)]
        );
    }

    #[test]
    fn unparseable_input_stops_scanning() {
        let input = b"GET / HTTP/1.1\r\nBad\0Header: x\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(verdicts(input, 8192, 2), vec![None, None]);
        let bad_chunk = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\
                          POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(verdicts(bad_chunk, 8192, 2), vec![None, None]);
    }

    #[test]
    fn many_headers_beyond_the_stack_array() {
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..300 {
            input.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            verdicts(&input, 1 << 16, 1),
            vec![Some(DuplicateContentLength)]
        );
    }

    #[test]
    fn violation_metadata() {
        assert_eq!(TeAndContentLength.code(), "te_and_content_length");
        assert_eq!(DuplicateContentLength.code(), "duplicate_content_length");
        assert_eq!(HeadTooLarge.code(), "head_too_large");
        assert_eq!(TeAndContentLength.status(), 400);
        assert_eq!(DuplicateContentLength.status(), 400);
        assert_eq!(HeadTooLarge.status(), 431);
        for v in [TeAndContentLength, DuplicateContentLength, HeadTooLarge] {
            assert_eq!(HeadViolation::from_u8(v.to_u8()), Some(v));
            assert!(!v.message().is_empty());
        }
    }

    mod over_hyper {
        use super::super::*;
        use std::convert::Infallible;
        use std::net::SocketAddr;
        use std::time::Duration;

        use http_body_util::{BodyExt, Full};
        use hyper::body::{Bytes, Incoming};
        use hyper::server::conn::http1;
        use hyper::service::service_fn;
        use hyper::{Request, Response};
        use hyper_util::rt::TokioIo;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        async fn serve(max_head_bytes: usize) -> SocketAddr {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (io, verdicts) = GuardedIo::new(tcp, max_head_bytes);
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let verdicts = verdicts.clone();
                        async move {
                            if let Some(v) = verdicts.check_next() {
                                let resp = Response::builder()
                                    .status(v.status())
                                    .header("connection", "close")
                                    .body(Full::new(Bytes::from(v.code())))
                                    .unwrap();
                                return Ok::<_, Infallible>(resp);
                            }
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let text = format!("ok {}", body.len());
                            Ok(Response::new(Full::new(Bytes::from(text))))
                        }
                    });
                    tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(io), svc));
                }
            });
            addr
        }

        /// Sends raw bytes, returns everything the server wrote before closing.
        async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(request).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
                .await
                .expect("server should close the connection")
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }

        fn statuses(response: &str) -> Vec<&str> {
            response
                .match_indices("HTTP/1.1 ")
                .map(|(i, _)| &response[i + 9..i + 12])
                .collect()
        }

        #[tokio::test]
        async fn hyper_refuses_smuggling_shapes() {
            let addr = serve(1024).await;

            let te_cl = exchange(
                addr,
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
                  Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            )
            .await;
            assert_eq!(statuses(&te_cl), ["400"], "{te_cl}");
            assert!(te_cl.ends_with("te_and_content_length"), "{te_cl}");

            let dup_cl = exchange(
                addr,
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\
                  Connection: close\r\n\r\nhello",
            )
            .await;
            assert_eq!(statuses(&dup_cl), ["400"], "{dup_cl}");

            // Clean request first, then a smuggling one on the same keep-alive connection.
            let keep_alive = exchange(
                addr,
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
                  POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
                  Content-Length: 5\r\n\r\n0\r\n\r\n",
            )
            .await;
            assert_eq!(statuses(&keep_alive), ["200", "400"], "{keep_alive}");

            // An upgrade the service declines leaves hyper in HTTP/1 mode.
            let declined = exchange(
                addr,
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
                  POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            )
            .await;
            assert_eq!(statuses(&declined), ["200", "400"], "{declined}");

            let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ".to_vec();
            big.resize(big.len() + 2000, b'p');
            big.extend_from_slice(b"\r\n\r\n");
            let too_large = exchange(addr, &big).await;
            assert_eq!(statuses(&too_large), ["431"], "{too_large}");
            assert!(too_large.ends_with("head_too_large"), "{too_large}");
        }
    }
}
