//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`).

use serde_json::Value;

use super::ApiError;

/// Decode a protobuf body into the JSON form of its object.
pub fn decode(_bytes: &[u8]) -> Result<Value, ApiError> {
    Err(ApiError::UnsupportedMediaType(
        "protobuf request bodies are not accepted yet; send application/json".into(),
    ))
}
