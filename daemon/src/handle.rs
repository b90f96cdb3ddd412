//! What the servers (UAPI, control, metrics) hold: a handle on the task
//! that owns the control plane. Each call is a message to that task and an
//! answer back, so the servers never touch the state themselves and every
//! change is applied in the order it arrived.

use tokio::sync::{mpsc, oneshot};
use vpcgate_dns::Stats;
use vpcgate_plane::device::SetRequest;
use vpcgate_plane::view::Sample;
use vpcgate_proto::{Request, Response};
use zeroize::Zeroizing;

/// A request to the owner task, with where its answer goes.
pub enum Call {
    /// The reply to a UAPI `get`, formatted whole. It holds the private
    /// key, so it is zeroized and sized before it is written.
    UapiGet(oneshot::Sender<Zeroizing<String>>),
    /// A UAPI `set`; the answer is 0 or a positive errno.
    UapiSet(SetRequest, oneshot::Sender<i32>),
    Control(Request, oneshot::Sender<Response>),
    Metrics(oneshot::Sender<Scrape>),
}

/// What one scrape reads from the owner: the control plane's sample and
/// the DNS forwarder's counters (`None` while it is off).
pub struct Scrape {
    pub sample: Sample,
    pub dns: Option<Stats>,
}

/// Calls queued before the owner takes them. Each client waits for its own
/// answer, so the queue is as long as the number of clients waiting.
const QUEUE: usize = 64;

#[derive(Clone)]
pub struct Handle {
    calls: mpsc::Sender<Call>,
}

/// The daemon is stopping and no longer answers.
pub const ESHUTDOWN: i32 = 108;

impl Handle {
    pub fn new() -> (Handle, mpsc::Receiver<Call>) {
        let (calls, inbox) = mpsc::channel(QUEUE);
        (Handle { calls }, inbox)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Call) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.calls.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// The reply to a UAPI `get`; `None` once the daemon is stopping.
    pub async fn uapi_get(&self) -> Option<Zeroizing<String>> {
        self.call(Call::UapiGet).await
    }

    /// Applies a UAPI `set`; on error nothing changed. Returns a positive
    /// errno.
    pub async fn uapi_set(&self, request: SetRequest) -> Result<(), i32> {
        match self.call(|tx| Call::UapiSet(request, tx)).await {
            Some(0) => Ok(()),
            Some(errno) => Err(errno),
            None => Err(ESHUTDOWN),
        }
    }

    pub async fn control(&self, request: Request) -> Response {
        self.call(|tx| Call::Control(request, tx))
            .await
            .unwrap_or_else(|| Response::Error {
                message: "vpcgated is shutting down".to_string(),
            })
    }

    pub async fn metrics_sample(&self) -> Option<Scrape> {
        self.call(Call::Metrics).await
    }
}
