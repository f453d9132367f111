//! Classification of LLM response payloads (OpenAI Chat/Completions/Responses, Anthropic
//! Messages, TGI, llama.cpp and Ollama native) and request bodies. Only counts, flags and a few
//! closed-vocabulary strings (model, finish reason) come out; no prompt or completion text is
//! kept.
//!
//! Parsing uses serde_json with borrowed structs that name only the needed fields; text fields
//! are checked for emptiness without being copied. Payloads cut by the capture limit fall back to
//! byte-level checks.

use std::borrow::Cow;
use std::fmt;

use memchr::memmem;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::shape::StreamKind;

/// What one stream event (SSE event or NDJSON line) or one non-streaming body says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventInfo<'a> {
    /// The shape's own end-of-stream marker: `data: [DONE]`, `message_stop`,
    /// `response.completed`/`incomplete`/`failed`, Ollama `done: true`.
    pub done: bool,
    /// Some choice carries generated content (text, reasoning or tool calls).
    pub content: bool,
    /// Tokens carried: per choice, `logprobs` entries if present, else 1 if it has content.
    pub tokens: u32,
    /// The stream says it is finished (finish reason, `stop: true`, TGI `generated_text`, or
    /// an end-of-stream marker).
    pub terminal: bool,
    /// The shape's own stop field, raw (map it with [`super::shape::finish_vocabulary`]).
    pub finish_reason: Option<Cow<'a, str>>,
    pub model: Option<Cow<'a, str>>,
    /// Output tokens from the shape's usage (`usage.completion_tokens`, `usage.output_tokens`,
    /// `response.usage.output_tokens`, `eval_count`, `tokens_predicted`, TGI
    /// `generated_tokens`).
    pub completion_tokens: Option<u64>,
    /// Prompt tokens from the shape's usage (`prompt_tokens`, `input_tokens`,
    /// `prompt_eval_count`, `tokens_evaluated`).
    pub prompt_tokens: Option<u64>,
    /// An error object; `Some(code)` with the HTTP-like code when it carries one.
    pub error: Option<Option<u16>>,
    /// The JSON did not parse and the byte-level fallback was used.
    pub fallback: bool,
    /// The API shape this payload belongs to, when its members say so.
    pub kind: Option<StreamKind>,
    /// Per-choice content and stop, for shapes with parallel choices (OpenAI `choices[].index`,
    /// `n > 1`); empty for shapes with one output sequence (the whole event is choice 0).
    pub choices: Vec<ChoiceEvent<'a>>,
}

/// One choice's part of an event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChoiceEvent<'a> {
    /// `choices[].index` (0 when absent).
    pub index: u32,
    /// Tokens this event carries for the choice (0: no content).
    pub tokens: u32,
    pub finish_reason: Option<Cow<'a, str>>,
}

/// Classifies one SSE event's data or a non-streaming JSON body. Payloads that do not parse
/// (cut by the capture limit) get the byte-level check (`fallback` set).
pub fn classify(data: &[u8]) -> EventInfo<'_> {
    classify_event(b"", data)
}

/// Classifies one stream event given its SSE `event:` name (empty when none, and for NDJSON
/// lines). The name and the payload's `type` member both identify Responses and Anthropic
/// events; either suffices.
pub fn classify_event<'a>(name: &'a [u8], data: &'a [u8]) -> EventInfo<'a> {
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" {
        return EventInfo {
            done: true,
            terminal: true,
            ..Default::default()
        };
    }
    let name = std::str::from_utf8(name).unwrap_or("");
    match serde_json::from_slice::<Payload<'_>>(trimmed) {
        Ok(p) => p.into_info(name),
        Err(_) => {
            let mut info = fallback(trimmed);
            fallback_by_name(name, trimmed, &mut info);
            info
        }
    }
}

/// `model` and `stream` from a (possibly cut) request body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestInfo<'a> {
    pub model: Option<Cow<'a, str>>,
    pub stream: Option<bool>,
}

/// Reads `model` and `stream` from the captured prefix of a request body.
pub fn request_info(body: &[u8]) -> RequestInfo<'_> {
    #[derive(Deserialize)]
    struct Req<'a> {
        #[serde(borrow, default)]
        model: Option<Cow<'a, str>>,
        #[serde(default)]
        stream: Option<bool>,
    }
    let body = body.trim_ascii();
    if let Ok(r) = serde_json::from_slice::<Req<'_>>(body) {
        return RequestInfo {
            model: r.model,
            stream: r.stream,
        };
    }
    // Cut JSON: an unescaped `"key"` followed by `:` can only be a key (quotes inside strings are
    // escaped), so a byte search is sound up to nesting.
    RequestInfo {
        model: string_value(body, b"\"model\"").map(Cow::Borrowed),
        stream: bool_value(body, b"\"stream\""),
    }
}

/// The members of every known shape's events, in one borrowed struct (unknown members are
/// skipped by serde without being copied).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Payload<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    choices: Option<Choices<'a>>,
    usage: Option<Usage>,
    error: Option<ErrorField>,
    #[serde(borrow)]
    object: Option<Cow<'a, str>>,
    code: Option<Code>,
    /// Responses and Anthropic event type (`response.output_text.delta`, `message_delta`).
    #[serde(borrow, rename = "type")]
    ty: Option<Cow<'a, str>>,
    // TGI native (`/generate_stream`).
    token: Option<TgiToken>,
    generated_text: Option<IgnoredAny>,
    #[serde(borrow)]
    details: Option<TgiDetails<'a>>,
    // llama.cpp native (`/completion`).
    content: Option<NonEmpty>,
    stop: Option<bool>,
    tokens_predicted: Option<u64>,
    tokens_evaluated: Option<u64>,
    #[serde(borrow)]
    stop_type: Option<Cow<'a, str>>,
    /// Anthropic `content_block_delta`/`message_delta` object; Responses delta text.
    #[serde(borrow)]
    delta: Option<StrOr<AnthropicDelta<'a>>>,
    /// Anthropic `message_start` message; Ollama `/api/chat` message; an error's text.
    #[serde(borrow)]
    message: Option<StrOr<Message<'a>>>,
    /// Responses `response` object; Ollama `/api/generate` text.
    #[serde(borrow)]
    response: Option<StrOr<ResponseObject<'a>>>,
    /// Responses delta events: one entry per token.
    logprobs: Option<LooseLen>,
    // Anthropic and Responses non-streaming bodies.
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    incomplete_details: Option<Incomplete<'a>>,
    // Ollama native (`/api/generate`, `/api/chat`).
    done: Option<bool>,
    #[serde(borrow)]
    done_reason: Option<Cow<'a, str>>,
    eval_count: Option<u64>,
    prompt_eval_count: Option<u64>,
    created_at: Option<IgnoredAny>,
    thinking: Option<NonEmpty>,
}

/// A member that is a string in one shape and an object in another.
enum StrOr<T> {
    /// A string: whether it is non-empty (read raw, never unescaped or copied).
    Str(bool),
    Obj(T),
    Other,
}

impl<T> StrOr<T> {
    fn nonempty_str(&self) -> bool {
        matches!(self, StrOr::Str(true))
    }
    fn obj(&self) -> Option<&T> {
        match self {
            StrOr::Obj(t) => Some(t),
            _ => None,
        }
    }
    fn into_obj(self) -> Option<T> {
        match self {
            StrOr::Obj(t) => Some(t),
            _ => None,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for StrOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        let v = raw.get();
        Ok(match v.as_bytes().first() {
            Some(b'"') => StrOr::Str(v.len() > 2),
            Some(b'{') => StrOr::Obj(serde_json::from_str::<T>(v).map_err(de::Error::custom)?),
            _ => StrOr::Other,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AnthropicDelta<'a> {
    text: Option<NonEmpty>,
    thinking: Option<NonEmpty>,
    partial_json: Option<NonEmpty>,
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

impl AnthropicDelta<'_> {
    fn has_content(&self) -> bool {
        [&self.text, &self.thinking, &self.partial_json]
            .iter()
            .any(|f| f.as_ref().is_some_and(|v| v.0))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Message<'a> {
    /// Ollama: the text; Anthropic `message_start`: an (empty) array of blocks.
    content: Option<NonEmpty>,
    thinking: Option<NonEmpty>,
    tool_calls: Option<NonEmpty>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<Usage>,
}

impl Message<'_> {
    fn has_content(&self) -> bool {
        [&self.content, &self.thinking, &self.tool_calls]
            .iter()
            .any(|f| f.as_ref().is_some_and(|v| v.0))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseObject<'a> {
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<Usage>,
    #[serde(borrow)]
    incomplete_details: Option<Incomplete<'a>>,
    error: Option<ErrorField>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Incomplete<'a> {
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
}

/// What a Responses or Anthropic event type says, decided before the payload is taken apart.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Typed {
    ResponsesDelta,
    ResponsesEnd,
    ResponsesOther,
    AnthropicStart,
    AnthropicBlockDelta,
    AnthropicMessageDelta,
    AnthropicStop,
    AnthropicOther,
    /// A whole Anthropic message (non-streaming body).
    AnthropicBody,
    Error,
    None,
}

fn typed(ty: &str) -> Typed {
    match ty {
        "message_start" => Typed::AnthropicStart,
        "content_block_delta" => Typed::AnthropicBlockDelta,
        "message_delta" => Typed::AnthropicMessageDelta,
        "message_stop" => Typed::AnthropicStop,
        "content_block_start" | "content_block_stop" | "ping" => Typed::AnthropicOther,
        "message" => Typed::AnthropicBody,
        "error" => Typed::Error,
        "response.completed" | "response.incomplete" | "response.failed" => Typed::ResponsesEnd,
        t if t.starts_with("response.") && t.ends_with(".delta") => Typed::ResponsesDelta,
        t if t.starts_with("response.") => Typed::ResponsesOther,
        _ => Typed::None,
    }
}

impl<'a> Payload<'a> {
    fn into_info(self, name: &str) -> EventInfo<'a> {
        let ty = match self.ty.as_deref() {
            Some(t) if !t.is_empty() => typed(t),
            _ => typed(name),
        };
        let ty_is_failed =
            self.ty.as_deref() == Some("response.failed") || name == "response.failed";
        let ty_is_incomplete =
            self.ty.as_deref() == Some("response.incomplete") || name == "response.incomplete";
        let mut info = EventInfo {
            model: self.model,
            ..Default::default()
        };
        if let Some(e) = self.error {
            info.error = Some(e.0);
        } else if self.object.as_deref() == Some("error") || ty == Typed::Error {
            info.error = Some(self.code.and_then(|c| c.0));
        }
        let usage = |info: &mut EventInfo<'a>, u: Usage| {
            info.completion_tokens = u.completion_tokens.or(u.output_tokens);
            info.prompt_tokens = u.prompt_tokens.or(u.input_tokens);
        };
        match ty {
            Typed::ResponsesDelta | Typed::ResponsesEnd | Typed::ResponsesOther => {
                info.kind = Some(StreamKind::OpenaiResponses);
                if ty == Typed::ResponsesDelta && self.delta.is_some_and(|d| d.nonempty_str()) {
                    info.content = true;
                    info.tokens = self
                        .logprobs
                        .and_then(|l| l.0)
                        .filter(|&n| n > 0)
                        .unwrap_or(1);
                }
                if ty == Typed::ResponsesEnd {
                    info.done = true;
                    info.terminal = true;
                    let r = self.response.and_then(StrOr::into_obj).unwrap_or_default();
                    if let Some(u) = r.usage {
                        usage(&mut info, u);
                    }
                    info.model = info.model.or(r.model);
                    info.finish_reason = if ty_is_failed {
                        info.error = Some(r.error.and_then(|e| e.0));
                        Some(Cow::Borrowed("failed"))
                    } else if ty_is_incomplete {
                        Some(
                            r.incomplete_details
                                .and_then(|d| d.reason)
                                .unwrap_or(Cow::Borrowed("incomplete")),
                        )
                    } else {
                        r.status.or(Some(Cow::Borrowed("completed")))
                    };
                }
                return info;
            }
            Typed::AnthropicStart
            | Typed::AnthropicBlockDelta
            | Typed::AnthropicMessageDelta
            | Typed::AnthropicStop
            | Typed::AnthropicOther
            | Typed::AnthropicBody => {
                info.kind = Some(StreamKind::AnthropicMessages);
                match ty {
                    Typed::AnthropicStart => {
                        if let Some(m) = self.message.and_then(StrOr::into_obj) {
                            info.model = info.model.or(m.model);
                            // `output_tokens` here is a running count, not the final one.
                            info.prompt_tokens = m.usage.and_then(|u| u.input_tokens);
                        }
                    }
                    Typed::AnthropicBlockDelta => {
                        let has = self
                            .delta
                            .as_ref()
                            .and_then(StrOr::obj)
                            .is_some_and(AnthropicDelta::has_content);
                        info.content = has;
                        info.tokens = u32::from(has);
                    }
                    Typed::AnthropicMessageDelta => {
                        if let Some(fr) = self
                            .delta
                            .and_then(StrOr::into_obj)
                            .and_then(|d| d.stop_reason)
                        {
                            info.terminal = true;
                            info.finish_reason = Some(fr);
                        }
                        if let Some(u) = self.usage {
                            usage(&mut info, u);
                        }
                    }
                    Typed::AnthropicStop => {
                        info.done = true;
                        info.terminal = true;
                    }
                    Typed::AnthropicBody => {
                        if let Some(u) = self.usage {
                            usage(&mut info, u);
                        }
                        if self.stop_reason.is_some() {
                            info.terminal = true;
                            info.finish_reason = self.stop_reason;
                        }
                    }
                    _ => {}
                }
                return info;
            }
            Typed::Error | Typed::None => {}
        }
        if self.object.as_deref() == Some("response") {
            // A non-streaming Responses body.
            info.kind = Some(StreamKind::OpenaiResponses);
            if let Some(u) = self.usage {
                usage(&mut info, u);
            }
            info.terminal = self.status.is_some();
            info.finish_reason = match self.incomplete_details.and_then(|d| d.reason) {
                Some(r) => Some(r),
                None => self.status,
            };
            return info;
        }
        if let Some(c) = self.choices {
            info.kind = match self.object.as_deref() {
                Some(o) if o.starts_with("chat.completion") => Some(StreamKind::OpenaiChat),
                Some("text_completion") => Some(StreamKind::OpenaiCompletion),
                _ if c.chat => Some(StreamKind::OpenaiChat),
                _ if c.text => Some(StreamKind::OpenaiCompletion),
                _ => None,
            };
            info.content = c.content;
            info.tokens = c.tokens;
            info.terminal = c.finish_reason.is_some();
            info.finish_reason = c.finish_reason;
            info.choices = c.per_choice;
        }
        if let Some(u) = self.usage {
            usage(&mut info, u);
        }
        if let Some(t) = self.token {
            info.kind = info.kind.or(Some(StreamKind::Tgi));
            if t.text.0 && !t.special {
                info.content = true;
                info.tokens += 1;
            }
        }
        if self.generated_text.is_some() {
            info.terminal = true;
        }
        if let Some(d) = self.details {
            if d.finish_reason.is_some() {
                info.kind = info.kind.or(Some(StreamKind::Tgi));
                info.terminal = true;
                info.finish_reason = d.finish_reason;
            }
            info.completion_tokens = info.completion_tokens.or(d.generated_tokens);
        }
        let ollama = self.done.is_some()
            && (self.created_at.is_some()
                || self
                    .response
                    .as_ref()
                    .is_some_and(|r| matches!(r, StrOr::Str(_)))
                || self.message.as_ref().is_some_and(|m| m.obj().is_some()));
        if ollama {
            info.kind = info.kind.or(Some(StreamKind::Ollama));
            let text = self.response.as_ref().is_some_and(StrOr::nonempty_str)
                || self.thinking.as_ref().is_some_and(|t| t.0)
                || self
                    .message
                    .as_ref()
                    .and_then(StrOr::obj)
                    .is_some_and(Message::has_content);
            if text {
                info.content = true;
                info.tokens = info.tokens.max(1);
            }
            if self.done == Some(true) {
                info.done = true;
                info.terminal = true;
                info.finish_reason = self.done_reason.or(info.finish_reason);
                info.completion_tokens = info.completion_tokens.or(self.eval_count);
                info.prompt_tokens = info.prompt_tokens.or(self.prompt_eval_count);
            }
            return info;
        }
        if self.stop.is_some() && (self.content.is_some() || self.tokens_predicted.is_some()) {
            info.kind = info.kind.or(Some(StreamKind::Llamacpp));
        }
        if self.content.is_some_and(|c| c.0) {
            info.content = true;
            info.tokens += 1;
        }
        if self.stop == Some(true) {
            info.terminal = true;
            info.finish_reason = info.finish_reason.or(self.stop_type);
            info.completion_tokens = info.completion_tokens.or(self.tokens_predicted);
            info.prompt_tokens = info.prompt_tokens.or(self.tokens_evaluated);
        }
        info
    }
}

/// Folds `choices`, keeping per choice only its index, token count and stop.
#[derive(Default)]
struct Choices<'a> {
    content: bool,
    tokens: u32,
    finish_reason: Option<Cow<'a, str>>,
    /// Some choice has `delta` or `message` (chat shape).
    chat: bool,
    /// Some choice has `text` (completions shape).
    text: bool,
    per_choice: Vec<ChoiceEvent<'a>>,
}

/// Choices of one event kept individually; more are folded into the totals only.
const MAX_CHOICES_PER_EVENT: usize = 256;

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Choices<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("choices array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut acc = Choices::default();
                let mut position = 0u32;
                while let Some(c) = seq.next_element::<Choice<'a>>()? {
                    let has = c.has_content();
                    acc.chat |= c.delta.is_some() || c.message.is_some();
                    acc.text |= c.text.is_some();
                    if has {
                        acc.content = true;
                    }
                    let lp = c.logprobs.and_then(|l| l.content.or(l.tokens)).map(|n| n.0);
                    let tokens = match lp {
                        Some(n) => n,
                        None => u32::from(has),
                    };
                    acc.tokens = acc.tokens.saturating_add(tokens);
                    if c.finish_reason.is_some() {
                        acc.finish_reason.clone_from(&c.finish_reason);
                    }
                    if acc.per_choice.len() < MAX_CHOICES_PER_EVENT {
                        acc.per_choice.push(ChoiceEvent {
                            index: c.index.unwrap_or(position),
                            tokens,
                            finish_reason: c.finish_reason,
                        });
                    }
                    position = position.saturating_add(1);
                }
                Ok(acc)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Choices::default())
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Choice<'a> {
    /// `choices[].index` (`n > 1`: which parallel completion this is).
    index: Option<u32>,
    delta: Option<Delta>,
    /// Non-streaming chat.
    message: Option<Delta>,
    /// Completions API.
    text: Option<NonEmpty>,
    logprobs: Option<Logprobs>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

impl Choice<'_> {
    fn has_content(&self) -> bool {
        self.text.as_ref().is_some_and(|t| t.0)
            || self.delta.as_ref().is_some_and(Delta::has_content)
            || self.message.as_ref().is_some_and(Delta::has_content)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Delta {
    content: Option<NonEmpty>,
    reasoning_content: Option<NonEmpty>,
    reasoning: Option<NonEmpty>,
    tool_calls: Option<NonEmpty>,
    function_call: Option<NonEmpty>,
}

impl Delta {
    fn has_content(&self) -> bool {
        [
            &self.content,
            &self.reasoning_content,
            &self.reasoning,
            &self.tool_calls,
            &self.function_call,
        ]
        .iter()
        .any(|f| f.as_ref().is_some_and(|v| v.0))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Logprobs {
    /// Chat: one entry per token.
    content: Option<SeqLen>,
    /// Completions: one entry per token.
    tokens: Option<SeqLen>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Usage {
    completion_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    /// Anthropic and Responses names.
    output_tokens: Option<u64>,
    input_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TgiToken {
    text: NonEmpty,
    special: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TgiDetails<'a> {
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
    generated_tokens: Option<u64>,
}

/// Whether a JSON value is "non-empty" (string, array or object with something in it).
/// Read as raw JSON text: no copy, no UTF-8 validation, no unescaping of generated text.
#[derive(Default)]
struct NonEmpty(bool);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        let v = raw.get().as_bytes();
        let nonempty = match v.first() {
            Some(b'"') => v.len() > 2,
            Some(b'[' | b'{') => v[1..v.len() - 1].iter().any(|b| !b.is_ascii_whitespace()),
            _ => false,
        };
        Ok(NonEmpty(nonempty))
    }
}

/// Length of a JSON array if the value is one (anything else: `None`), without keeping its
/// elements.
struct LooseLen(Option<u32>);

impl<'de> Deserialize<'de> for LooseLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        if raw.get().starts_with('[') {
            let n = serde_json::from_str::<SeqLen>(raw.get()).map_err(de::Error::custom)?;
            Ok(LooseLen(Some(n.0)))
        } else {
            Ok(LooseLen(None))
        }
    }
}

/// Length of a JSON array, without keeping its elements.
struct SeqLen(u32);

impl<'de> Deserialize<'de> for SeqLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SeqLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SeqLen, A::Error> {
                let mut n = 0u32;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n = n.saturating_add(1);
                }
                Ok(SeqLen(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// An `error` member: an object (OpenAI/vLLM, maybe with a numeric `code`) or a string (TGI).
struct ErrorField(Option<u16>);

impl<'de> Deserialize<'de> for ErrorField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("error object or string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<ErrorField, E> {
                Ok(ErrorField(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ErrorField, A::Error> {
                let mut code = None;
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    if k == "code" {
                        code = map.next_value::<Code>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ErrorField(code))
            }
        }
        d.deserialize_any(V)
    }
}

/// An HTTP-like status code given as a number or a numeric string; anything else is `None`.
#[derive(Default)]
struct Code(Option<u16>);

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Code;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("code")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Code, E> {
                Ok(Code(
                    u16::try_from(v).ok().filter(|c| (100..600).contains(c)),
                ))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Code, E> {
                Ok(Code(
                    u16::try_from(v).ok().filter(|c| (100..600).contains(c)),
                ))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Code, E> {
                Ok(Code(None))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Code, E> {
                Ok(Code(
                    v.parse::<u16>().ok().filter(|c| (100..600).contains(c)),
                ))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Code, E> {
                Ok(Code(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Code, E> {
                Ok(Code(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Byte-level reading of a payload that did not parse (usually cut by the capture limit).
fn fallback(data: &[u8]) -> EventInfo<'_> {
    let mut info = EventInfo {
        fallback: true,
        ..Default::default()
    };
    let content = [
        &b"\"content\""[..],
        b"\"text\"",
        b"\"reasoning_content\"",
        b"\"reasoning\"",
        // Anthropic deltas, Ollama `/api/generate` text, Responses delta text.
        b"\"thinking\"",
        b"\"partial_json\"",
        b"\"response\"",
        b"\"delta\"",
    ]
    .iter()
    .any(|k| nonempty_string_after(data, k))
        || array_nonempty_after(data, b"\"tool_calls\"");
    if content {
        info.content = true;
        info.tokens = 1;
    }
    if let Some(fr) = string_value(data, b"\"finish_reason\"") {
        info.terminal = true;
        info.finish_reason = Some(Cow::Borrowed(fr));
    }
    // `generated_tokens`: TGI `details` (its non-streaming `/generate` may answer with an array).
    info.completion_tokens = number_value(data, b"\"completion_tokens\"")
        .or_else(|| number_value(data, b"\"generated_tokens\""));
    info.prompt_tokens = number_value(data, b"\"prompt_tokens\"");
    if bool_value(data, b"\"stop\"") == Some(true) {
        info.terminal = true;
        info.completion_tokens = info
            .completion_tokens
            .or(number_value(data, b"\"tokens_predicted\""));
    }
    if bool_value(data, b"\"done\"") == Some(true) {
        // Ollama's final line.
        info.done = true;
        info.terminal = true;
        info.completion_tokens = info
            .completion_tokens
            .or(number_value(data, b"\"eval_count\""));
        info.prompt_tokens = info
            .prompt_tokens
            .or(number_value(data, b"\"prompt_eval_count\""));
        if let Some(fr) = string_value(data, b"\"done_reason\"") {
            info.finish_reason = Some(Cow::Borrowed(fr));
        }
    }
    let key = |k: &[u8]| values(data, k).next().is_some();
    if key(b"\"created_at\"")
        && (key(b"\"response\"") || key(b"\"message\"") || key(b"\"done\""))
        && !key(b"\"choices\"")
    {
        info.kind = Some(StreamKind::Ollama);
    }
    info.model = string_value(data, b"\"model\"").map(Cow::Borrowed);
    if memmem::find(data, b"\"error\"").is_some_and(|i| value_start(data, i + 7).is_some()) {
        info.error = Some(number_value(data, b"\"code\"").and_then(|c| u16::try_from(c).ok()));
    }
    info
}

/// The byte-level reading of a cut Responses or Anthropic event, by its SSE name or, failing
/// that, its leading `"type"` member (both shapes put it first).
fn fallback_by_name<'a>(name: &'a str, data: &'a [u8], info: &mut EventInfo<'a>) {
    let ty = if name.is_empty() {
        string_value(data, b"\"type\"").unwrap_or("")
    } else {
        name
    };
    let t = typed(ty);
    match t {
        Typed::ResponsesDelta | Typed::ResponsesEnd | Typed::ResponsesOther => {
            info.kind = Some(StreamKind::OpenaiResponses);
            // A delta event cut before its `delta` still carried one (servers send no empty
            // deltas); only a visible empty one is not content.
            info.content = t == Typed::ResponsesDelta && !empty_string_after(data, b"\"delta\"");
            info.tokens = u32::from(info.content);
            info.finish_reason = None;
            info.terminal = false;
            if t == Typed::ResponsesEnd {
                info.done = true;
                info.terminal = true;
                info.completion_tokens = number_value(data, b"\"output_tokens\"");
                info.prompt_tokens = number_value(data, b"\"input_tokens\"");
                info.finish_reason = Some(Cow::Borrowed(match ty {
                    "response.failed" => "failed",
                    "response.incomplete" => "incomplete",
                    _ => "completed",
                }));
                if ty == "response.failed" {
                    info.error = Some(None);
                }
            }
        }
        Typed::AnthropicStart
        | Typed::AnthropicBlockDelta
        | Typed::AnthropicMessageDelta
        | Typed::AnthropicStop
        | Typed::AnthropicOther
        | Typed::AnthropicBody => {
            info.kind = Some(StreamKind::AnthropicMessages);
            // Cut text/thinking/tool-input deltas are content; signature deltas are not.
            info.content = t == Typed::AnthropicBlockDelta
                && (info.content
                    || (memmem::find(data, b"signature").is_none()
                        && !["\"text\"", "\"thinking\"", "\"partial_json\""]
                            .iter()
                            .any(|k| empty_string_after(data, k.as_bytes()))));
            info.tokens = u32::from(info.content);
            match t {
                Typed::AnthropicStart => {
                    info.completion_tokens = None;
                    info.prompt_tokens = number_value(data, b"\"input_tokens\"");
                }
                Typed::AnthropicMessageDelta | Typed::AnthropicBody => {
                    info.completion_tokens = number_value(data, b"\"output_tokens\"");
                    info.prompt_tokens = number_value(data, b"\"input_tokens\"");
                    if let Some(fr) = string_value(data, b"\"stop_reason\"") {
                        info.terminal = true;
                        info.finish_reason = Some(Cow::Borrowed(fr));
                    }
                }
                Typed::AnthropicStop => {
                    info.done = true;
                    info.terminal = true;
                }
                _ => {}
            }
        }
        Typed::Error => info.error = Some(info.error.flatten()),
        Typed::None => {}
    }
}

/// Position of the value after `"key"` at `after` (skips whitespace, colon, whitespace).
fn value_start(data: &[u8], after: usize) -> Option<usize> {
    let mut i = after;
    while data.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    if data.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    while data.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    (i < data.len()).then_some(i)
}

/// Values of every occurrence of `key` used as a key.
fn values<'d>(data: &'d [u8], key: &'d [u8]) -> impl Iterator<Item = usize> + 'd {
    memmem::find_iter(data, key).filter_map(move |p| value_start(data, p + key.len()))
}

fn nonempty_string_after(data: &[u8], key: &[u8]) -> bool {
    values(data, key).any(|v| data[v] == b'"' && data.get(v + 1).is_some_and(|&c| c != b'"'))
}

fn empty_string_after(data: &[u8], key: &[u8]) -> bool {
    values(data, key).any(|v| data[v] == b'"' && data.get(v + 1) == Some(&b'"'))
}

fn array_nonempty_after(data: &[u8], key: &[u8]) -> bool {
    values(data, key).any(|v| {
        data[v] == b'['
            && data[v + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&c| c != b']')
    })
}

/// A complete string value without escapes (model names, finish reasons).
fn string_value<'d>(data: &'d [u8], key: &'d [u8]) -> Option<&'d str> {
    values(data, key).find_map(|v| {
        if data[v] != b'"' {
            return None;
        }
        let s = &data[v + 1..];
        let end = memchr::memchr2(b'"', b'\\', s)?;
        if s[end] != b'"' || end > 256 {
            return None;
        }
        std::str::from_utf8(&s[..end]).ok()
    })
}

fn bool_value(data: &[u8], key: &[u8]) -> Option<bool> {
    values(data, key).find_map(|v| {
        let s = &data[v..];
        if s.starts_with(b"true") {
            Some(true)
        } else if s.starts_with(b"false") {
            Some(false)
        } else {
            None
        }
    })
}

/// A complete unsigned integer value (not cut at the end of the data).
fn number_value(data: &[u8], key: &[u8]) -> Option<u64> {
    values(data, key).find_map(|v| {
        let s = &data[v..];
        let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 || n == s.len() || n > 19 {
            return None;
        }
        std::str::from_utf8(&s[..n]).ok()?.parse().ok()
    })
}

#[cfg(test)]
mod tests;
