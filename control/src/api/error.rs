//! API errors and the one place they become Kubernetes `Status` answers.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::store;

/// One field-level problem, as `details.causes[]` carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub reason: String,
    pub message: String,
    pub field: String,
}

impl Cause {
    pub fn new(reason: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Cause {
            reason: reason.into(),
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn required(field: impl Into<String>) -> Self {
        Cause::new("FieldValueRequired", field, "Required value")
    }
    /// A required value, with why.
    pub fn required_msg(field: impl Into<String>, why: &str) -> Self {
        Cause::new(
            "FieldValueRequired",
            field,
            format!("Required value: {why}"),
        )
    }
    pub fn invalid(field: impl Into<String>, value: &str, why: &str) -> Self {
        Cause::new(
            "FieldValueInvalid",
            field,
            format!("Invalid value: \"{value}\": {why}"),
        )
    }
}

/// What went wrong, grouped by the HTTP answer it gets.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    Forbidden {
        message: String,
    },
    NotFound {
        kind: String,
        name: String,
    },
    /// A path no resource answers.
    NoRoute(String),
    MethodNotAllowed(String),
    AlreadyExists {
        group: String,
        kind: String,
        name: String,
    },
    Conflict {
        kind: String,
        name: String,
        message: String,
        causes: Vec<Cause>,
    },
    Invalid {
        group: String,
        kind: String,
        name: String,
        causes: Vec<Cause>,
    },
    Gone(String),
    /// Try again later: an eviction a disruption budget does not allow now.
    TooManyRequests {
        message: String,
        causes: Vec<Cause>,
    },
    UnsupportedMediaType(String),
    NotAcceptable(String),
    TooLarge(usize),
    Unavailable(String),
    Internal(String),
    /// An admission webhook's refusal: the `Status` it gave, with its code (at least 400).
    Denied(Value),
}

impl ApiError {
    pub fn not_found(kind: &str, name: &str) -> Self {
        ApiError::NotFound {
            kind: kind.into(),
            name: name.into(),
        }
    }

    /// The standard conflict for a stale resourceVersion or a failed precondition.
    pub fn modified(qualified: &str, name: &str) -> Self {
        ApiError::Conflict {
            kind: qualified.into(),
            name: name.into(),
            message: format!(
                "Operation cannot be fulfilled on {qualified} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
            causes: vec![],
        }
    }

    pub fn code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AlreadyExists { .. } | ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Denied(s) => s["code"]
                .as_u64()
                .and_then(|c| StatusCode::from_u16(c as u16).ok())
                .filter(|c| c.as_u16() >= 400)
                .unwrap_or(StatusCode::BAD_REQUEST),
        }
    }

    /// The `Status` object kubectl and client libraries parse.
    pub fn status(&self) -> Value {
        let code = self.code().as_u16();
        let (reason, message, details) = match self {
            ApiError::BadRequest(m) => ("BadRequest", m.clone(), None),
            ApiError::Unauthorized => ("Unauthorized", "Unauthorized".to_string(), None),
            ApiError::Forbidden { message } => ("Forbidden", message.clone(), None),
            ApiError::NotFound { kind, name } => (
                "NotFound",
                format!("{kind} \"{name}\" not found"),
                Some(json!({"name": name, "kind": kind})),
            ),
            ApiError::NoRoute(m) => ("NotFound", m.clone(), None),
            ApiError::MethodNotAllowed(m) => ("MethodNotAllowed", m.clone(), None),
            ApiError::AlreadyExists { group, kind, name } => {
                let q = qualified(group, kind);
                (
                    "AlreadyExists",
                    format!("{q} \"{name}\" already exists"),
                    Some(json!({"name": name, "group": group, "kind": kind})),
                )
            }
            ApiError::Conflict {
                kind,
                name,
                message,
                causes,
            } => {
                let mut d = json!({"name": name, "kind": kind});
                if !causes.is_empty() {
                    d["causes"] = causes_json(causes);
                }
                ("Conflict", message.clone(), Some(d))
            }
            ApiError::Invalid {
                group,
                kind,
                name,
                causes,
            } => {
                let list: Vec<String> = causes
                    .iter()
                    .map(|c| {
                        if c.field.is_empty() {
                            c.message.clone()
                        } else {
                            format!("{}: {}", c.field, c.message)
                        }
                    })
                    .collect();
                let summary = if list.len() == 1 {
                    list[0].clone()
                } else {
                    format!("[{}]", list.join(", "))
                };
                (
                    "Invalid",
                    format!(
                        "{} \"{name}\" is invalid: {summary}",
                        qualified(group, kind)
                    ),
                    Some(json!({"name": name, "group": group, "kind": kind,
                                "causes": causes_json(causes)})),
                )
            }
            ApiError::Gone(m) => ("Expired", m.clone(), None),
            ApiError::TooManyRequests { message, causes } => (
                "TooManyRequests",
                message.clone(),
                Some(json!({"causes": causes_json(causes)})),
            ),
            ApiError::UnsupportedMediaType(m) => ("UnsupportedMediaType", m.clone(), None),
            ApiError::NotAcceptable(m) => ("NotAcceptable", m.clone(), None),
            ApiError::TooLarge(n) => (
                "RequestEntityTooLarge",
                format!("the request body is larger than {n} bytes"),
                None,
            ),
            ApiError::Unavailable(m) => ("ServiceUnavailable", m.clone(), None),
            ApiError::Internal(m) => ("InternalError", m.clone(), None),
            ApiError::Denied(s) => return s.clone(),
        };
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        });
        if let Some(d) = details {
            s["details"] = d;
        }
        s
    }
}

fn causes_json(causes: &[Cause]) -> Value {
    Value::Array(
        causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect(),
    )
}

/// `deployments.apps`, or `pods` for the core group.
pub fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.status();
        write!(f, "{}", s["message"].as_str().unwrap_or("error"))
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::Unavailable(m) => ApiError::Unavailable(m),
            store::Error::Compacted {
                requested,
                compacted,
            } => ApiError::Gone(format!(
                "too old resource version: {requested} ({compacted})"
            )),
            store::Error::Invalid(m) => ApiError::BadRequest(m),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_) | ApiError::Unavailable(_)) {
            tracing::warn!(error = %self, "request failed");
        }
        let mut r = (self.code(), self.status().to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, ApiError::Unauthorized) {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"outpost\""),
            );
        }
        r
    }
}
