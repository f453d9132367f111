//! Classification of OpenAI-compatible (and TGI / llama.cpp native) response payloads and
//! request bodies. Only counts, flags and a few closed-vocabulary strings (model, finish reason)
//! come out; no prompt or completion text is kept.
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

/// What one SSE event (or one non-streaming body) says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventInfo<'a> {
    /// `data: [DONE]`.
    pub done: bool,
    /// Some choice carries generated content (text, reasoning or tool calls).
    pub content: bool,
    /// Tokens carried: per choice, `logprobs` entries if present, else 1 if it has content.
    pub tokens: u32,
    /// The stream says it is finished (finish reason, `stop: true`, TGI `generated_text`).
    pub terminal: bool,
    pub finish_reason: Option<Cow<'a, str>>,
    pub model: Option<Cow<'a, str>>,
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
    /// An error object; `Some(code)` with the HTTP-like code when it carries one.
    pub error: Option<Option<u16>>,
    /// The JSON did not parse and the byte-level fallback was used.
    pub fallback: bool,
}

/// Classifies one SSE event's data or a non-streaming JSON body. Payloads that do not parse
/// (cut by the capture limit) get the byte-level check (`fallback` set).
pub fn classify(data: &[u8]) -> EventInfo<'_> {
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" {
        return EventInfo {
            done: true,
            terminal: true,
            ..Default::default()
        };
    }
    match serde_json::from_slice::<Payload<'_>>(trimmed) {
        Ok(p) => p.into_info(),
        Err(_) => fallback(trimmed),
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
}

impl<'a> Payload<'a> {
    fn into_info(self) -> EventInfo<'a> {
        let mut info = EventInfo {
            model: self.model,
            ..Default::default()
        };
        if let Some(c) = self.choices {
            info.content = c.content;
            info.tokens = c.tokens;
            info.terminal = c.finish_reason.is_some();
            info.finish_reason = c.finish_reason;
        }
        if let Some(u) = self.usage {
            info.completion_tokens = u.completion_tokens;
            info.prompt_tokens = u.prompt_tokens;
        }
        if let Some(e) = self.error {
            info.error = Some(e.0);
        } else if self.object.as_deref() == Some("error") {
            info.error = Some(self.code.and_then(|c| c.0));
        }
        if let Some(t) = self.token {
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
                info.terminal = true;
                info.finish_reason = d.finish_reason;
            }
            info.completion_tokens = info.completion_tokens.or(d.generated_tokens);
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

/// Folds `choices` without allocating a Vec.
#[derive(Default)]
struct Choices<'a> {
    content: bool,
    tokens: u32,
    finish_reason: Option<Cow<'a, str>>,
}

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
                while let Some(c) = seq.next_element::<Choice<'a>>()? {
                    let has = c.has_content();
                    if has {
                        acc.content = true;
                    }
                    let lp = c.logprobs.and_then(|l| l.content.or(l.tokens)).map(|n| n.0);
                    acc.tokens = acc.tokens.saturating_add(match lp {
                        Some(n) => n,
                        None => u32::from(has),
                    });
                    if c.finish_reason.is_some() {
                        acc.finish_reason = c.finish_reason;
                    }
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
    info.model = string_value(data, b"\"model\"").map(Cow::Borrowed);
    if memmem::find(data, b"\"error\"").is_some_and(|i| value_start(data, i + 7).is_some()) {
        info.error = Some(number_value(data, b"\"code\"").and_then(|c| u16::try_from(c).ok()));
    }
    info
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
