//! The proxy's own answers: every failure is classified once, here, into a status code and
//! a JSON body that names the cause (contract §3).

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("backend `{backend}` ({endpoint}) refused or failed the connection: {detail}")]
    Connect {
        backend: String,
        endpoint: String,
        detail: String,
    },
    #[error("backend `{backend}` ({endpoint}) did not answer within {timeout_ms} ms")]
    Timeout {
        backend: String,
        endpoint: String,
        timeout_ms: u128,
    },
    #[error("backend `{backend}` ({endpoint}) failed: {detail}")]
    Upstream {
        backend: String,
        endpoint: String,
        detail: String,
    },
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: &'static str,
        status: StatusCode,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest { status, .. } => *status,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Connect { .. } => "upstream_connect_failed",
            ProxyError::Timeout { .. } => "upstream_timeout",
            ProxyError::Upstream { .. } => "upstream_failed",
            ProxyError::BadRequest { code, .. } => code,
        }
    }

    /// `host:port` of the endpoint an upstream failure happened at; `None` for the client's
    /// own faults.
    pub fn endpoint_authority(&self) -> Option<String> {
        match self {
            ProxyError::Connect { endpoint, .. }
            | ProxyError::Timeout { endpoint, .. }
            | ProxyError::Upstream { endpoint, .. } => Some(
                endpoint
                    .split_once("://")
                    .map_or(endpoint.as_str(), |(_, authority)| authority)
                    .to_string(),
            ),
            ProxyError::BadRequest { .. } => None,
        }
    }

    /// Requests the proxy refuses on framing grounds leave the connection in an unknown
    /// state, so it is closed after the answer.
    fn closes_connection(&self) -> bool {
        matches!(self, ProxyError::BadRequest { .. })
    }

    /// What a client may read: the cause, never a backend's name, address or OS error
    /// (those go to the log with the request id).
    fn public_message(&self) -> &'static str {
        match self {
            ProxyError::Connect { .. } => "the backend could not be reached",
            ProxyError::Timeout { .. } => "the backend did not answer in time",
            ProxyError::Upstream { .. } => "the backend failed before answering",
            ProxyError::BadRequest { message, .. } => message,
        }
    }

    pub fn into_response(self, request_id: Option<&HeaderValue>) -> Response<Full<Bytes>> {
        let mut body = serde_json::json!({
            "error": { "code": self.code(), "message": self.public_message() }
        });
        if let Some(id) = request_id.and_then(|v| v.to_str().ok()) {
            body["error"]["request_id"] = serde_json::Value::from(id);
        }
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.closes_connection() {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(id) = request_id {
            response.headers_mut().insert("x-request-id", id.clone());
        }
        response
    }
}
