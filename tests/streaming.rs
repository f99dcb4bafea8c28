//! Streaming, end to end: a 100 MB upload and a 100 MB download pass through the proxy
//! frame by frame, and the proxy's resident memory stays flat while they do (it never
//! buffers a body).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use support::*;

const TOTAL: u64 = 100 * 1024 * 1024;
const FRAME: usize = 64 * 1024;
/// How much the proxy's RSS may grow over its warmed-up level during a transfer.
const RSS_BOUND_KIB: u64 = 20 * 1024;

/// Polls the proxy's RSS every 20 ms until stopped; yields the highest value and how many
/// samples were taken.
struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u32)>,
}

impl RssSampler {
    fn start(proxy: Arc<Switchyard>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut max, mut samples) = (0u64, 0u32);
            while !flag.load(Ordering::Relaxed) {
                max = max.max(proxy.rss_kib());
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (max, samples)
        });
        RssSampler { stop, task }
    }

    async fn finish(self) -> (u64, u32) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// A body of `total` bytes produced lazily in 64 KiB frames that all share one buffer.
fn generated_body(total: u64) -> BoxBody {
    let chunk = Bytes::from(vec![b'u'; FRAME]);
    let frames = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let len = (total - sent).min(FRAME as u64);
            Some((
                Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len as usize))),
                sent + len,
            ))
        }
    });
    BodyExt::boxed(StreamBody::new(frames))
}

async fn upload(url: &str, total: u64) -> (StatusCode, String) {
    let req = Request::builder()
        .method("POST")
        .uri(url)
        .body(generated_body(total))
        .unwrap();
    let response = client().request(req).await.expect("upload");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Downloads `url`, counting the body frame by frame and dropping each frame.
async fn download(url: &str) -> (StatusCode, u64, u64) {
    let req = Request::builder()
        .uri(url)
        .body(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = client().request(req).await.expect("download");
    let status = response.status();
    let mut body = response.into_body();
    let (mut total, mut frames) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
            frames += 1;
        }
    }
    (status, total, frames)
}

/// A proxy in front of one echo backend, warmed up with a small transfer each way.
async fn warmed_proxy(legacy: &Backend, target: &Backend) -> (Arc<Switchyard>, u64) {
    let proxy = Arc::new(Switchyard::start(&two_sided_config(
        legacy,
        target,
        "{ percentage: { weight: 0 } }",
        None,
    )));
    let (status, body) = upload(&proxy.url("/__upload"), 1024 * 1024).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "1048576"));
    let (status, total, _) = download(&proxy.url("/__download/1048576")).await;
    assert_eq!((status, total), (StatusCode::OK, 1024 * 1024));
    let baseline = proxy.rss_kib();
    (proxy, baseline)
}

fn assert_rss_bounded(what: &str, baseline: u64, during: u64, after: u64, samples: u32) {
    // A transfer this size takes far longer than a few polls; fewer samples would mean the
    // bound below was never really checked while bytes were moving.
    assert!(
        samples >= 3,
        "{what}: only {samples} RSS samples were taken"
    );
    let peak = during.max(after);
    assert!(
        peak.saturating_sub(baseline) < RSS_BOUND_KIB,
        "{what}: proxy RSS grew from {baseline} KiB to {peak} KiB (during {during}, after {after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_upload_streams_with_flat_proxy_memory() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let (proxy, baseline) = warmed_proxy(&legacy, &target).await;

    let sampler = RssSampler::start(proxy.clone());
    let (status, body) = upload(&proxy.url("/__upload"), TOTAL).await;
    let (during, samples) = sampler.finish().await;
    let after = proxy.rss_kib();

    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, TOTAL.to_string(), "bytes the backend counted");
    assert_rss_bounded("upload", baseline, during, after, samples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_download_streams_with_flat_proxy_memory() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let (proxy, baseline) = warmed_proxy(&legacy, &target).await;

    let sampler = RssSampler::start(proxy.clone());
    let (status, total, frames) = download(&proxy.url(&format!("/__download/{TOTAL}"))).await;
    let (during, samples) = sampler.finish().await;
    let after = proxy.rss_kib();

    assert_eq!(status, StatusCode::OK);
    assert_eq!(total, TOTAL, "bytes the client counted");
    assert!(frames > 1, "the body arrived in one piece, not streamed");
    assert_rss_bounded("download", baseline, during, after, samples);
}
