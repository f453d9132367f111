//! The closed vocabularies a streamed LLM response is reported in: which API shape it spoke
//! ([`StreamKind`]) and why generation stopped ([`finish_vocabulary`]).
//!
//! Shapes are recognised from the bytes (Content-Type, SSE `event:` names, the JSON members of
//! each event), never from the server or the request path, so a proxy or a server that serves
//! several APIs is read correctly.

use serde::Serialize;

/// The API shape of a response body, as recognised from its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// No event or body of a known shape was seen.
    #[default]
    Unknown,
    /// OpenAI Chat Completions (`chat.completion[.chunk]`, `choices[].delta`/`message`).
    OpenaiChat,
    /// OpenAI (legacy) Completions (`text_completion`, `choices[].text`).
    OpenaiCompletion,
    /// OpenAI Responses API (`response.*` events, `response` objects).
    OpenaiResponses,
    /// Anthropic Messages (`message_start`, `content_block_delta`, `message_delta`, ...).
    AnthropicMessages,
    /// Hugging Face TGI native (`/generate_stream`: `token`, `generated_text`, `details`).
    Tgi,
    /// llama.cpp native (`/completion`: `content`, `stop`, `tokens_predicted`).
    Llamacpp,
    /// Ollama native NDJSON (`/api/generate`, `/api/chat`: `response`/`message`, `done`).
    Ollama,
    /// Newline-delimited JSON objects of no known shape.
    JsonLines,
}

impl StreamKind {
    /// Every kind, for label sets and docs.
    pub const ALL: [StreamKind; 9] = [
        StreamKind::Unknown,
        StreamKind::OpenaiChat,
        StreamKind::OpenaiCompletion,
        StreamKind::OpenaiResponses,
        StreamKind::AnthropicMessages,
        StreamKind::Tgi,
        StreamKind::Llamacpp,
        StreamKind::Ollama,
        StreamKind::JsonLines,
    ];

    /// The name used in JSON lines and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Unknown => "unknown",
            StreamKind::OpenaiChat => "openai_chat",
            StreamKind::OpenaiCompletion => "openai_completion",
            StreamKind::OpenaiResponses => "openai_responses",
            StreamKind::AnthropicMessages => "anthropic_messages",
            StreamKind::Tgi => "tgi",
            StreamKind::Llamacpp => "llamacpp",
            StreamKind::Ollama => "ollama",
            StreamKind::JsonLines => "json_lines",
        }
    }

    /// The shape has an end-of-stream marker (`[DONE]`, `message_stop`, `response.completed`,
    /// `done: true`, a finish reason...), so a stream that ends without one was cut. Streams of
    /// no known shape have none: their end is just the end of the body.
    pub fn has_terminal_marker(self) -> bool {
        !matches!(self, StreamKind::Unknown | StreamKind::JsonLines)
    }

    /// A shape was recognised (the events mean what the shape says).
    pub fn is_known(self) -> bool {
        self.has_terminal_marker()
    }
}

/// Maps a shape's own stop field (OpenAI `finish_reason`, Anthropic `stop_reason`, Ollama
/// `done_reason`, TGI `details.finish_reason`, llama.cpp `stop_type`, Responses
/// `incomplete_details.reason`) onto one closed vocabulary:
///
/// | reported          | from                                                                  |
/// |-------------------|-----------------------------------------------------------------------|
/// | `stop`            | `stop`, `eos`, `eos_token`, `end_turn`, `stop_sequence`, `word`, Responses `completed` |
/// | `length`          | `length`, `max_tokens`, `limit`, `max_output_tokens`, `model_context_window_exceeded` |
/// | `tool_calls`      | `tool_calls`, `tool_use`, `function_call`                              |
/// | `content_filter`  | `content_filter`, `refusal`                                            |
/// | `error`           | `error`, Responses `failed`                                            |
/// | `cancelled`       | `abort`, `cancelled`, `canceled`, `unload`                             |
/// | `other`           | anything else (`pause_turn`, `none`, free text...)                     |
///
/// Nothing outside this vocabulary can leave the agent through this field.
pub fn finish_vocabulary(raw: &str) -> &'static str {
    let lower = |s: &str| s.trim().to_ascii_lowercase();
    match lower(raw).as_str() {
        "stop" | "eos" | "eos_token" | "end_turn" | "stop_sequence" | "word" | "completed" => {
            "stop"
        }
        "length"
        | "max_tokens"
        | "limit"
        | "max_output_tokens"
        | "max_length"
        | "model_context_window_exceeded" => "length",
        "tool_calls" | "tool_use" | "function_call" => "tool_calls",
        "content_filter" | "refusal" => "content_filter",
        "error" | "failed" => "error",
        "abort" | "cancelled" | "canceled" | "unload" => "cancelled",
        _ => "other",
    }
}

/// The vocabulary [`finish_vocabulary`] maps onto.
pub const FINISH_REASONS: [&str; 7] = [
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "error",
    "cancelled",
    "other",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_map_into_the_closed_vocabulary() {
        for (raw, want) in [
            ("stop", "stop"),
            ("eos_token", "stop"),
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("word", "stop"),
            ("length", "length"),
            ("max_tokens", "length"),
            ("limit", "length"),
            ("max_output_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("tool_calls", "tool_calls"),
            ("refusal", "content_filter"),
            ("abort", "cancelled"),
            ("pause_turn", "other"),
            ("none", "other"),
            ("a prompt's text \u{e9}", "other"),
            ("", "other"),
        ] {
            assert_eq!(finish_vocabulary(raw), want, "{raw}");
            assert!(FINISH_REASONS.contains(&finish_vocabulary(raw)));
        }
    }

    #[test]
    fn kind_names_are_distinct_and_serde_agrees() {
        let mut names: Vec<_> = StreamKind::ALL.iter().map(|k| k.as_str()).collect();
        for k in StreamKind::ALL {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::String(k.as_str().into())
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), StreamKind::ALL.len());
        assert!(!StreamKind::Unknown.has_terminal_marker());
        assert!(!StreamKind::JsonLines.has_terminal_marker());
        assert!(StreamKind::Ollama.has_terminal_marker());
    }
}
