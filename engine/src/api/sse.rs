//! Server-sent-events framing of streamed responses: `data: {json}\n\n` ... `data: [DONE]\n\n`.

use axum::body::Bytes;
use serde::Serialize;

/// The frame that ends every OpenAI stream.
pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

/// One `data:` frame carrying `value` as single-line JSON.
pub fn json_frame<T: Serialize>(value: &T) -> Bytes {
    // serde_json never emits raw newlines (they are escaped inside strings), so one line is safe.
    let json = serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"message":"serialization failed: {e}","type":"server_error","param":null,"code":null}}}}"#)
    });
    raw_frame(&json)
}

/// One `data:` frame with an already-serialized JSON payload.
pub fn raw_frame(json: &str) -> Bytes {
    let mut out = String::with_capacity(json.len() + 8);
    out.push_str("data: ");
    out.push_str(json);
    out.push_str("\n\n");
    Bytes::from(out)
}

pub fn done_frame() -> Bytes {
    Bytes::from_static(DONE_FRAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_single_data_lines() {
        let f = json_frame(&serde_json::json!({"text": "a\nb\n\nc"}));
        let s = std::str::from_utf8(&f).unwrap();
        assert!(s.starts_with("data: {"));
        assert!(s.ends_with("}\n\n"));
        assert_eq!(
            s.matches('\n').count(),
            2,
            "payload newlines must be escaped: {s:?}"
        );
        let payload: serde_json::Value = serde_json::from_str(&s[6..s.len() - 2]).unwrap();
        assert_eq!(payload["text"], "a\nb\n\nc");
        assert_eq!(&done_frame()[..], b"data: [DONE]\n\n");
    }
}
