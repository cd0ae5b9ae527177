//! Response bodies written piece by piece from a blocking task: a small channel
//! between the task (a scan, a walk over every device) and the connection, so memory
//! stays bounded however large the answer and a client that hangs up stops the work.
//! [`StreamedJson`] labels such a body as JSON of a schema, so the OpenAPI document
//! says what it holds as for a [`Json`] answer.

use std::marker::PhantomData;
use std::ops::ControlFlow;

use bytes::Bytes;
use poem::{Body, IntoResponse, Response};
use poem_openapi::ApiResponse;
use poem_openapi::payload::{Json, Payload};
use poem_openapi::registry::{MetaResponses, MetaSchemaRef, Registry};
use poem_openapi::types::ToJSON;

/// Chunks in flight between the writing task and the connection. With chunks of a
/// few hundred KiB, four keep the socket busy while the task writes the next.
const CHANNEL_CHUNKS: usize = 4;

/// The sending half of a streamed body, used from a blocking task.
pub struct BodySender {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    hung_up: bool,
}

impl BodySender {
    /// A response body and the sender that fills it; the body ends when the sender
    /// is dropped.
    pub fn channel() -> (Body, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let sender = Self { tx, hung_up: false };
        (Body::from_bytes_stream(stream), sender)
    }

    /// Sends a chunk, waiting while the client is slow; `Break` once it has hung up.
    pub fn send(&mut self, chunk: Bytes) -> ControlFlow<()> {
        if self.hung_up {
            return ControlFlow::Break(());
        }
        if chunk.is_empty() {
            return ControlFlow::Continue(());
        }
        match self.tx.blocking_send(Ok(chunk)) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => {
                self.hung_up = true;
                ControlFlow::Break(())
            }
        }
    }

    /// Whether the client went away before the end.
    pub fn hung_up(&self) -> bool {
        self.hung_up
    }

    /// Aborts the body, so the client sees a broken transfer, not a short answer.
    pub fn fail(self, error: &str) {
        let _ = self
            .tx
            .blocking_send(Err(std::io::Error::other(error.to_owned())));
    }
}

/// A JSON body of schema `T` that is streamed rather than built in memory: in the
/// OpenAPI document it is the same as `Json<T>`.
pub struct StreamedJson<T> {
    body: Body,
    schema: PhantomData<fn() -> T>,
}

impl<T> StreamedJson<T> {
    /// `body` must hold one JSON document of schema `T`.
    pub fn new(body: Body) -> Self {
        Self {
            body,
            schema: PhantomData,
        }
    }
}

impl<T: ToJSON> Payload for StreamedJson<T> {
    const CONTENT_TYPE: &'static str = Json::<T>::CONTENT_TYPE;

    fn check_content_type(content_type: &str) -> bool {
        Json::<T>::check_content_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: ToJSON> IntoResponse for StreamedJson<T> {
    fn into_response(self) -> Response {
        Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(self.body)
    }
}

impl<T: ToJSON> ApiResponse for StreamedJson<T> {
    fn meta() -> MetaResponses {
        Json::<T>::meta()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}
