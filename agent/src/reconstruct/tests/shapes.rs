//! Every streaming API shape through the Reconstructor, written from each API's public
//! streaming documentation (OpenAI Responses streaming events, Anthropic Messages streaming,
//! Ollama API, TGI, llama.cpp server), plus `n > 1` and the bad input of each new parser.

use super::*;

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
const NDJSON_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n";
const JSON_CHUNKED_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";

fn sse(name: &str, data: &str) -> Vec<u8> {
    chunk(format!("event: {name}\ndata: {data}\n\n").as_bytes())
}

/// OpenAI Responses API stream (as documented): created, in_progress, item/part added, text
/// deltas, the `.done` events that repeat the whole text (not content), completed with usage.
fn responses_stream(sim: &mut Sim, t0: u64, deltas: &[&str], end: &str) {
    sim.read(
        t0,
        &post(
            "/v1/responses",
            r#"{"model":"gpt-4.1","input":"Say hi","stream":true}"#,
        ),
    );
    sim.write(t0 + 10, SSE_HEAD);
    let resp = |status: &str, usage: &str| {
        format!(
            r#"{{"id":"resp_67c9","object":"response","created_at":1741290958,"status":"{status}","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"temperature":1.0,"text":{{"format":{{"type":"text"}}}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{usage},"metadata":{{}}}}"#
        )
    };
    sim.write(
        t0 + 20,
        &sse(
            "response.created",
            &format!(
                r#"{{"type":"response.created","sequence_number":0,"response":{}}}"#,
                resp("in_progress", "null")
            ),
        ),
    );
    sim.write(
        t0 + 21,
        &sse(
            "response.in_progress",
            &format!(
                r#"{{"type":"response.in_progress","sequence_number":1,"response":{}}}"#,
                resp("in_progress", "null")
            ),
        ),
    );
    sim.write(t0 + 22, &sse("response.output_item.added", r#"{"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_67c9","type":"message","status":"in_progress","role":"assistant","content":[]}}"#));
    sim.write(t0 + 23, &sse("response.content_part.added", r#"{"type":"response.content_part.added","sequence_number":3,"item_id":"msg_67c9","output_index":0,"content_index":0,"part":{"type":"output_text","text":"","annotations":[]}}"#));
    for (i, d) in deltas.iter().enumerate() {
        sim.write(
            t0 + 100 * (i as u64 + 1),
            &sse("response.output_text.delta", &format!(r#"{{"type":"response.output_text.delta","sequence_number":{},"item_id":"msg_67c9","output_index":0,"content_index":0,"delta":"{d}","logprobs":[]}}"#, i + 4)),
        );
    }
    let t = t0 + 100 * (deltas.len() as u64 + 1);
    let text: String = deltas.concat();
    sim.write(t, &sse("response.output_text.done", &format!(r#"{{"type":"response.output_text.done","sequence_number":90,"item_id":"msg_67c9","output_index":0,"content_index":0,"text":"{text}"}}"#)));
    sim.write(t + 1, &sse("response.content_part.done", &format!(r#"{{"type":"response.content_part.done","sequence_number":91,"item_id":"msg_67c9","output_index":0,"content_index":0,"part":{{"type":"output_text","text":"{text}","annotations":[]}}}}"#)));
    sim.write(t + 2, &sse("response.output_item.done", &format!(r#"{{"type":"response.output_item.done","sequence_number":92,"output_index":0,"item":{{"id":"msg_67c9","type":"message","status":"completed","role":"assistant","content":[{{"type":"output_text","text":"{text}","annotations":[]}}]}}}}"#)));
    if !end.is_empty() {
        sim.write(
            t + 3,
            &sse(
                end.split('|').next().unwrap(),
                end.split('|').nth(1).unwrap(),
            ),
        );
    }
    sim.write(t + 4, b"0\r\n\r\n");
}

#[test]
fn openai_responses_stream() {
    let mut sim = Sim::new();
    sim.open(0);
    let done = r#"response.completed|{"type":"response.completed","sequence_number":93,"response":{"id":"resp_67c9","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there!","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}}}"#;
    responses_stream(&mut sim, 1_000, &["Hi", " there", "!"], done);
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::OpenaiResponses);
    assert_eq!(r.token_ns, vec![1_100, 1_200, 1_300]);
    assert_eq!(r.first_token_ns, Some(1_100));
    assert_eq!(
        (r.output_tokens, r.token_count_source, r.prompt_tokens),
        (Some(11), Some(TokenCountSource::Usage), Some(37))
    );
    assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.model.as_deref(), Some("gpt-4.1"));
    assert!(r.choices.is_empty() && r.token_choice.is_empty());
}

#[test]
fn openai_responses_incomplete_failed_and_cut() {
    let mut sim = Sim::new();
    sim.open(0);
    let inc = r#"response.incomplete|{"type":"response.incomplete","sequence_number":9,"response":{"id":"r","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7}}}"#;
    responses_stream(&mut sim, 1_000, &["a", "b"], inc);
    let r = sim.one();
    assert_eq!(
        (r.finish_reason.as_deref(), r.output_tokens, r.error),
        (Some("length"), Some(2), None)
    );
    let failed = r#"response.failed|{"type":"response.failed","sequence_number":9,"response":{"id":"r","object":"response","status":"failed","error":{"code":"server_error","message":"The model failed"},"incomplete_details":null,"usage":null}}"#;
    responses_stream(&mut sim, 10_000, &["a"], failed);
    let r = sim.one();
    assert_eq!(
        (r.finish_reason.as_deref(), r.error),
        (Some("error"), Some(RequestError::Http5xx))
    );
    // No response.completed: the shape has an end marker, so the stream was cut.
    responses_stream(&mut sim, 20_000, &["a", "b"], "");
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::Truncated));
    assert_eq!(
        (r.output_tokens, r.token_count_source),
        (Some(2), Some(TokenCountSource::Counted))
    );
    // A stream `error` event.
    sim.read(30_000, &post("/v1/responses", r#"{"stream":true}"#));
    sim.write(30_010, SSE_HEAD);
    sim.write(30_020, &sse("error", r#"{"type":"error","code":"ERR_SOMETHING","message":"Something went wrong","param":null,"sequence_number":1}"#));
    sim.write(30_030, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::Http5xx), "{r:?}");
}

/// Anthropic Messages streaming as documented: message_start with input usage, ping, text,
/// thinking and tool-input deltas (all content), signature deltas (not), message_delta with the
/// stop reason and the final output usage, message_stop.
fn anthropic_stream(sim: &mut Sim, t0: u64, stop: bool) {
    sim.read(
        t0,
        &post(
            "/v1/messages",
            r#"{"model":"claude-opus-4-1","max_tokens":256,"messages":[{"role":"user","content":"Hello"}],"stream":true}"#,
        ),
    );
    sim.write(t0 + 10, SSE_HEAD);
    sim.write(t0 + 20, &sse("message_start", r#"{"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-1-20250805", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}"#));
    sim.write(t0 + 30, &sse("content_block_start", r#"{"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}"#));
    sim.write(t0 + 40, &sse("ping", r#"{"type": "ping"}"#));
    sim.write(t0 + 100, &sse("content_block_delta", r#"{"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think"}}"#));
    sim.write(t0 + 150, &sse("content_block_delta", r#"{"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}"#));
    sim.write(
        t0 + 160,
        &sse(
            "content_block_stop",
            r#"{"type": "content_block_stop", "index": 0}"#,
        ),
    );
    sim.write(t0 + 170, &sse("content_block_start", r#"{"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}"#));
    sim.write(t0 + 200, &sse("content_block_delta", r#"{"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hello"}}"#));
    sim.write(t0 + 300, &sse("content_block_delta", r#"{"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "!"}}"#));
    sim.write(
        t0 + 310,
        &sse(
            "content_block_stop",
            r#"{"type": "content_block_stop", "index": 1}"#,
        ),
    );
    sim.write(t0 + 320, &sse("content_block_start", r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#));
    sim.write(t0 + 400, &sse("content_block_delta", r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San Fra"}}"#));
    sim.write(
        t0 + 410,
        &sse(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":2}"#,
        ),
    );
    if stop {
        sim.write(t0 + 500, &sse("message_delta", r#"{"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence":null}, "usage": {"output_tokens": 15}}"#));
        sim.write(
            t0 + 510,
            &sse("message_stop", r#"{"type": "message_stop"}"#),
        );
    }
    sim.write(t0 + 520, b"0\r\n\r\n");
}

#[test]
fn anthropic_messages_stream() {
    let mut sim = Sim::new();
    sim.open(0);
    anthropic_stream(&mut sim, 1_000, true);
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::AnthropicMessages);
    // Content blocks are sequential, not choices: one timeline.
    assert_eq!(r.token_ns, vec![1_100, 1_200, 1_300, 1_400]);
    assert!(r.choices.is_empty() && r.token_choice.is_empty());
    assert_eq!(
        r.itl_ns().collect::<Vec<_>>(),
        vec![100, 100, 100],
        "block boundaries are ordinary gaps"
    );
    assert_eq!(
        (r.output_tokens, r.token_count_source, r.prompt_tokens),
        (Some(15), Some(TokenCountSource::Usage), Some(25))
    );
    assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!((r.error, r.end_ns), (None, 1_520));
    // Without message_delta/message_stop the stream was cut.
    anthropic_stream(&mut sim, 10_000, false);
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::Truncated));
    assert_eq!(
        (r.output_tokens, r.token_count_source),
        (Some(4), Some(TokenCountSource::Counted))
    );
    // The documented overload error event.
    sim.read(20_000, &post("/v1/messages", r#"{"stream":true}"#));
    sim.write(20_010, SSE_HEAD);
    sim.write(20_020, &sse("message_start", r#"{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"model":"claude","usage":{"input_tokens":3,"output_tokens":1}}}"#));
    sim.write(
        20_030,
        &sse(
            "error",
            r#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
        ),
    );
    sim.write(20_040, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::Http5xx), "{r:?}");
    assert_eq!(r.prompt_tokens, Some(3));
}

/// Anthropic events recognised by their `event:` names alone (a proxy that strips `type`) and
/// by `type` alone (a server that sends no `event:` lines).
#[test]
fn anthropic_by_event_name_or_type_alone() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(100, &post("/v1/messages", r#"{"stream":true}"#));
    sim.write(110, SSE_HEAD);
    sim.write(
        120,
        &sse(
            "content_block_delta",
            r#"{"index":0,"delta":{"type":"text_delta","text":"x"}}"#,
        ),
    );
    sim.write(130, &chunk(b"data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"y\"}}\n\n"));
    sim.write(
        140,
        &sse(
            "message_delta",
            r#"{"delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}"#,
        ),
    );
    sim.write(150, &sse("message_stop", "{}"));
    sim.write(151, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::AnthropicMessages);
    assert_eq!(r.token_ns, vec![120, 130]);
    assert_eq!(
        (r.output_tokens, r.finish_reason.as_deref(), r.error),
        (Some(2), Some("stop"), None)
    );
}

fn ollama_line(model: &str, field: &str, text: &str) -> String {
    match field {
        "response" => format!(
            r#"{{"model":"{model}","created_at":"2023-08-04T08:52:19.385406455-07:00","response":"{text}","done":false}}"#
        ),
        _ => format!(
            r#"{{"model":"{model}","created_at":"2023-08-04T08:52:19.385406455-07:00","message":{{"role":"assistant","content":"{text}","images":null}},"done":false}}"#
        ),
    }
}

#[test]
fn ollama_generate_and_chat_ndjson() {
    let mut sim = Sim::new();
    sim.open(0);
    // /api/generate: one line per write.
    sim.read(
        1_000,
        &post(
            "/api/generate",
            r#"{"model":"llama3.2","prompt":"Why is the sky blue?"}"#,
        ),
    );
    sim.write(1_010, NDJSON_HEAD);
    for (i, w) in ["The", " sky", " is"].iter().enumerate() {
        let line = ollama_line("llama3.2", "response", w) + "\n";
        sim.write(1_100 + 100 * i as u64, &chunk(line.as_bytes()));
    }
    sim.write(1_400, &chunk(br#"{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"","done":true,"done_reason":"stop","context":[1,2,3],"total_duration":10706818083,"load_duration":6338219291,"prompt_eval_count":26,"prompt_eval_duration":130079000,"eval_count":259,"eval_duration":4232710000}
"#));
    sim.write(1_401, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::Ollama);
    assert!(
        r.stream,
        "Ollama streams by default: no `stream` in the body"
    );
    assert_eq!(r.token_ns, vec![1_100, 1_200, 1_300]);
    assert_eq!(
        (r.output_tokens, r.token_count_source, r.prompt_tokens),
        (Some(259), Some(TokenCountSource::Usage), Some(26))
    );
    assert_eq!((r.finish_reason.as_deref(), r.error), (Some("stop"), None));
    assert_eq!(r.model.as_deref(), Some("llama3.2"));

    // /api/chat, lines split across writes and coalesced into one write.
    sim.read(
        5_000,
        &post(
            "/api/chat",
            r#"{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    );
    sim.write(5_010, NDJSON_HEAD);
    let l1 = ollama_line("llama3.2", "message", "Hel") + "\n";
    let (a, b) = l1.split_at(20);
    sim.write(5_100, &chunk(a.as_bytes()));
    sim.write(5_150, &chunk(b.as_bytes()));
    let two = ollama_line("llama3.2", "message", "lo")
        + "\n"
        + &ollama_line("llama3.2", "message", "!")
        + "\n";
    sim.write(5_200, &chunk(two.as_bytes()));
    sim.write(5_300, &chunk(br#"{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","message":{"role":"assistant","content":""},"done_reason":"length","done":true,"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":3,"eval_duration":4535599000}
"#));
    sim.write(5_301, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::Ollama);
    assert_eq!(r.token_ns, vec![5_150, 5_200, 5_200]);
    assert_eq!(
        (r.output_tokens, r.finish_reason.as_deref(), r.error),
        (Some(3), Some("length"), None)
    );
}

#[test]
fn ollama_without_final_line_is_truncated_and_errors_are_errors() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        1_000,
        &post("/api/generate", r#"{"model":"m","prompt":"x"}"#),
    );
    sim.write(1_010, NDJSON_HEAD);
    sim.write(
        1_100,
        &chunk((ollama_line("m", "response", "a") + "\n").as_bytes()),
    );
    sim.write(1_101, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::Truncated));
    assert_eq!(
        (r.output_tokens, r.token_count_source),
        (Some(1), Some(TokenCountSource::Counted))
    );
    sim.read(
        2_000,
        &post("/api/generate", r#"{"model":"m","prompt":"x"}"#),
    );
    sim.write(2_010, NDJSON_HEAD);
    sim.write(
        2_100,
        &chunk((ollama_line("m", "response", "a") + "\n").as_bytes()),
    );
    sim.write(
        2_200,
        &chunk(b"{\"error\":\"an error was encountered while running the model\"}\n"),
    );
    sim.write(2_201, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::Http5xx), "{r:?}");
}

/// Ollama non-streaming (`"stream": false`): one JSON object with Content-Length.
#[test]
fn ollama_non_streaming_body() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        1_000,
        &post(
            "/api/generate",
            r#"{"model":"m","prompt":"x","stream":false}"#,
        ),
    );
    let body = br#"{"model":"m","created_at":"2023-08-04T19:22:45.499127Z","response":"The sky is blue.","done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":5}"#;
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    resp.extend_from_slice(body);
    sim.write(1_500, &resp);
    let r = sim.one();
    assert!(!r.stream);
    assert_eq!(r.stream_kind, StreamKind::Ollama);
    assert!(r.token_ns.is_empty());
    assert_eq!(
        (r.output_tokens, r.prompt_tokens, r.error),
        (Some(5), Some(26), None)
    );
}

/// llama.cpp server native `/completion` stream (`data: {"content":...,"stop":false}`).
#[test]
fn llamacpp_native_completion_stream() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        1_000,
        &post(
            "/completion",
            r#"{"prompt":"Paris is","n_predict":3,"stream":true}"#,
        ),
    );
    sim.write(1_010, b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Type: text/event-stream\r\nServer: llama.cpp\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (i, w) in [" the", " capital", " of"].iter().enumerate() {
        sim.write(
            1_100 + 100 * i as u64,
            &chunk(format!("data: {{\"index\":0,\"content\":\"{w}\",\"tokens\":[],\"stop\":false,\"id_slot\":-1,\"tokens_predicted\":{},\"tokens_evaluated\":4}}\n\n", i + 1).as_bytes()),
        );
    }
    sim.write(1_400, &chunk(b"data: {\"index\":0,\"content\":\"\",\"tokens\":[],\"id_slot\":0,\"stop\":true,\"model\":\"gpt-3.5-turbo\",\"tokens_predicted\":3,\"tokens_evaluated\":4,\"generation_settings\":{\"n_predict\":3},\"prompt\":\"<s> Paris is\",\"has_new_line\":false,\"truncated\":false,\"stop_type\":\"limit\",\"stopping_word\":\"\",\"tokens_cached\":6,\"timings\":{\"prompt_n\":4,\"predicted_n\":3}}\n\n"));
    sim.write(1_401, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::Llamacpp);
    assert_eq!(r.token_ns, vec![1_100, 1_200, 1_300]);
    assert_eq!(
        (r.output_tokens, r.token_count_source, r.prompt_tokens),
        (Some(3), Some(TokenCountSource::Usage), Some(4))
    );
    assert_eq!(
        (r.finish_reason.as_deref(), r.error),
        (Some("length"), None)
    );
}

/// A plain chunked `application/json` stream of JSON lines of no known shape: events keep
/// their times, no tokens are claimed, never an error.
#[test]
fn chunked_json_lines_of_unknown_shape() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(1_000, &post("/stream", r#"{"q":"x"}"#));
    sim.write(1_010, JSON_CHUNKED_HEAD);
    sim.write(1_100, &chunk(b"{\"seq\":0,\"piece\":\"a\"}\n"));
    sim.write(1_250, &chunk(b"{\"seq\":1,\"piece\":\"b\"}\n"));
    sim.write(1_300, &chunk(b"{\"seq\":2,\"piece\":\"c\"}\n"));
    sim.write(1_301, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::JsonLines);
    assert!(r.stream);
    assert_eq!(r.token_ns, vec![1_100, 1_250, 1_300]);
    assert_eq!(r.tokens_per_event, vec![1, 1, 1]);
    assert_eq!(r.first_token_ns, Some(1_100));
    assert_eq!(r.itl_ns().collect::<Vec<_>>(), vec![150, 50]);
    assert_eq!((r.output_tokens, r.token_count_source), (None, None));
    assert_eq!(r.error, None);

    // Ollama lines served as chunked application/json are recognised by their members.
    sim.read(
        2_000,
        &post("/api/generate", r#"{"model":"m","prompt":"x"}"#),
    );
    sim.write(2_010, JSON_CHUNKED_HEAD);
    sim.write(
        2_100,
        &chunk((ollama_line("m", "response", "a") + "\n").as_bytes()),
    );
    sim.write(
        2_200,
        &chunk((ollama_line("m", "response", "b") + "\n").as_bytes()),
    );
    sim.write(2_300, &chunk(b"{\"model\":\"m\",\"created_at\":\"x\",\"response\":\"\",\"done\":true,\"eval_count\":2,\"done_reason\":\"stop\"}\n"));
    sim.write(2_301, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::Ollama);
    assert_eq!(r.token_ns, vec![2_100, 2_200]);
    assert_eq!((r.output_tokens, r.error), (Some(2), None));

    // A chunked JSON body that is one pretty-printed object stays a non-streaming body.
    sim.read(
        3_000,
        &post("/v1/chat/completions", r#"{"model":"m","stream":false}"#),
    );
    sim.write(3_010, JSON_CHUNKED_HEAD);
    sim.write(3_100, &chunk(b"{\n  \"object\": \"chat.completion\",\n  \"choices\": [{\"index\": 0, \"message\": {\"content\": \"hi\"}, \"finish_reason\": \"stop\"}],\n  \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 1}\n}\n"));
    sim.write(3_101, b"0\r\n\r\n");
    let r = sim.one();
    assert!(!r.stream && r.token_ns.is_empty(), "{r:?}");
    assert_eq!(r.stream_kind, StreamKind::OpenaiChat);
    assert_eq!((r.output_tokens, r.error), (Some(1), None));
    // One JSON line in a chunked body: a non-streaming body too.
    sim.read(
        4_000,
        &post("/v1/completions", r#"{"model":"m","stream":false}"#),
    );
    sim.write(4_010, JSON_CHUNKED_HEAD);
    sim.write(4_100, &chunk(b"{\"object\":\"text_completion\",\"choices\":[{\"text\":\"x\",\"finish_reason\":\"length\"}],\"usage\":{\"completion_tokens\":4}}\n"));
    sim.write(4_101, b"0\r\n\r\n");
    let r = sim.one();
    assert!(!r.stream && r.token_ns.is_empty(), "{r:?}");
    assert_eq!(
        (r.output_tokens, r.finish_reason.as_deref()),
        (Some(4), Some("length"))
    );
}

/// SSE events no shape recognises: `stream_kind: unknown`, every event kept as a content event
/// (first event = first token, gaps between events), no token count, and no `truncated` for
/// the lack of an end marker the shape may not have.
#[test]
fn unknown_sse_shape_keeps_event_times() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(1_000, &post("/custom/stream", r#"{"x":1}"#));
    sim.write(1_010, SSE_HEAD);
    sim.write(1_100, &chunk(b"event: chunk\ndata: {\"piece\":1}\n\n"));
    sim.write(1_180, &chunk(b"event: custom.thing\ndata: plain text\n\n"));
    sim.write(1_200, &chunk(b"data: \xff\xfe\x80 invalid utf8\n\n"));
    sim.write(1_201, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::Unknown);
    assert_eq!(r.token_ns, vec![1_100, 1_180, 1_200]);
    assert_eq!(r.first_token_ns, Some(1_100));
    assert_eq!((r.output_tokens, r.token_count_source), (None, None));
    assert_eq!(r.error, None);
    assert!(r.stream);
}

/// Unknown event names inside a known shape are skipped, not counted.
#[test]
fn unknown_event_names_inside_a_known_shape() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(1_000, &post("/v1/messages", r#"{"stream":true}"#));
    sim.write(1_010, SSE_HEAD);
    sim.write(
        1_020,
        &sse(
            "message_start",
            r#"{"type":"message_start","message":{"usage":{"input_tokens":1,"output_tokens":1}}}"#,
        ),
    );
    sim.write(
        1_030,
        &sse(
            "future_event",
            r#"{"type":"future_event","text":"not content"}"#,
        ),
    );
    sim.write(
        1_100,
        &sse(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}"#,
        ),
    );
    sim.write(1_110, &sse("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":1}}"#));
    sim.write(1_120, &sse("message_stop", r#"{"type":"message_stop"}"#));
    sim.write(1_121, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.token_ns, vec![1_100]);
    assert_eq!((r.output_tokens, r.error), (Some(1), None));
}

fn vllm_n_chunk(index: u32, content: Option<&str>, finish: Option<&str>) -> Vec<u8> {
    let delta = content.map_or(r#"{"role":"assistant","content":""}"#.to_owned(), |c| {
        format!(r#"{{"content":"{c}"}}"#)
    });
    let fr = finish.map_or("null".to_owned(), |f| format!("\"{f}\""));
    chunk(format!("data: {{\"id\":\"chatcmpl-n\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":{index},\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{fr}}}]}}\n\n").as_bytes())
}

/// `n = 2` as vLLM streams it: one choice per chunk, interleaved; each choice finishes on its
/// own; usage counts both.
#[test]
fn n_greater_than_one_per_choice_accounting() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        1_000,
        &post(
            "/v1/chat/completions",
            r#"{"model":"m","n":2,"stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        ),
    );
    sim.write(1_010, SSE_HEAD);
    sim.write(1_020, &vllm_n_chunk(0, None, None));
    sim.write(1_021, &vllm_n_chunk(1, None, None));
    sim.write(1_100, &vllm_n_chunk(0, Some("a"), None));
    sim.write(1_110, &vllm_n_chunk(1, Some("x"), None));
    sim.write(1_200, &vllm_n_chunk(0, Some("b"), None));
    sim.write(1_230, &vllm_n_chunk(1, Some("y"), None));
    sim.write(1_300, &vllm_n_chunk(0, Some("c"), Some("stop")));
    // Choice 0 finished, choice 1 still running: not finished yet.
    sim.write(1_400, &vllm_n_chunk(1, Some("z"), None));
    sim.write(1_500, &vllm_n_chunk(1, Some("w"), Some("length")));
    sim.write(1_510, &chunk(br#"data: {"id":"chatcmpl-n","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":4,"total_tokens":11,"completion_tokens":7}}

"#));
    sim.write(1_520, &chunk(b"data: [DONE]\n\n"));
    sim.write(1_521, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.error, None);
    assert_eq!(r.stream_kind, StreamKind::OpenaiChat);
    assert_eq!(
        r.token_ns,
        vec![1_100, 1_110, 1_200, 1_230, 1_300, 1_400, 1_500]
    );
    assert_eq!(r.token_choice, vec![0, 1, 0, 1, 0, 1, 1]);
    assert_eq!(r.first_token_ns, Some(1_100));
    assert_eq!(
        (r.output_tokens, r.token_count_source),
        (Some(7), Some(TokenCountSource::Usage))
    );
    // Per-choice gaps only: 0: 100, 100; 1: 120, 170, 100.
    let mut itl: Vec<u64> = r.itl_ns().collect();
    itl.sort_unstable();
    assert_eq!(itl, vec![100, 100, 100, 120, 170]);
    assert_eq!(r.choices.len(), 2);
    let (c0, c1) = (&r.choices[0], &r.choices[1]);
    assert_eq!(
        (
            c0.index,
            c0.output_tokens,
            c0.content_events,
            c0.first_token_ns,
            c0.last_token_ns
        ),
        (0, 3, 3, Some(1_100), Some(1_300))
    );
    assert_eq!(c0.finish_reason.as_deref(), Some("stop"));
    assert_eq!(
        (
            c1.index,
            c1.output_tokens,
            c1.first_token_ns,
            c1.last_token_ns
        ),
        (1, 4, Some(1_110), Some(1_500))
    );
    assert_eq!(c1.finish_reason.as_deref(), Some("length"));
    // Mean of per-choice TPOT: (200/2 + 390/3) / 2.
    assert_eq!(r.tpot_ns(), Some((100 + 130) / 2));
}

/// With n = 2, a client that leaves once choice 0 finished did not get choice 1: a disconnect,
/// not a finished request.
#[test]
fn n_greater_than_one_finishes_when_all_choices_have() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        1_000,
        &post("/v1/completions", r#"{"model":"m","n":2,"stream":true}"#),
    );
    sim.write(1_010, SSE_HEAD);
    let ev = |i: u32, fin: &str| {
        chunk(format!("data: {{\"object\":\"text_completion\",\"choices\":[{{\"index\":{i},\"text\":\"t\",\"finish_reason\":{fin}}}]}}\n\n").as_bytes())
    };
    sim.write(1_100, &ev(0, "null"));
    sim.write(1_110, &ev(1, "null"));
    sim.write(1_200, &ev(0, "\"stop\""));
    // A half-close is not the end: the client may still read choice 1.
    sim.ev(ConnEvent::PeerClosed {
        conn: KEY,
        ts_ns: 1_250,
    });
    assert!(sim.out.is_empty(), "{:#?}", sim.out);
    // The client is gone for good: the next write fails.
    sim.ev(ConnEvent::Error {
        conn: KEY,
        dir: Direction::Out,
        ts_ns: 1_300,
        errno: 32,
    });
    let r = sim.one();
    assert_eq!(r.error, Some(RequestError::ClientDisconnect));
    assert_eq!(r.choices.len(), 2);
    assert_eq!(r.choices[1].finish_reason, None);
    assert_eq!(r.stream_kind, StreamKind::OpenaiCompletion);
}

/// Bad input for the new parsers: NDJSON cut by the capture (gap), a huge line, invalid UTF-8,
/// truncated events: counted, never a panic, and the record is still produced.
#[test]
fn ndjson_bad_input() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(
        1_000,
        &post("/api/generate", r#"{"model":"m","prompt":"x"}"#),
    );
    sim.write(1_010, NDJSON_HEAD);
    sim.cap = 128;
    // A line longer than the capture: its tail is a gap; the line is read truncated.
    let long = ollama_line("m", "response", &"w".repeat(300)) + "\n";
    sim.write(1_100, &chunk(long.as_bytes()));
    sim.write(
        1_200,
        &chunk((ollama_line("m", "response", "b") + "\n").as_bytes()),
    );
    sim.write(1_300, &chunk(b"\xff\xfe\xfd not json \x80\n"));
    sim.write(1_400, &chunk(b"{\"model\":\"m\",\"created_at\":\"x\",\"response\":\"\",\"done\":true,\"eval_count\":2}\n"));
    sim.write(1_401, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::Ollama);
    assert_eq!(r.token_ns, vec![1_100, 1_200]);
    assert_eq!((r.output_tokens, r.error), (Some(2), None));
    assert!(sim.r.stats().truncated_events >= 1);
    assert!(sim.r.stats().fallback_events >= 1);
}

/// A 1 MB line is bounded by `max_event_bytes` (memory stays bounded) and still counted.
#[test]
fn huge_ndjson_line_is_bounded() {
    let mut sim = Sim::new();
    sim.cap = 2 << 20;
    sim.open(0);
    sim.read(
        1_000,
        &post("/api/generate", r#"{"model":"m","prompt":"x"}"#),
    );
    sim.write(1_010, NDJSON_HEAD);
    let long = ollama_line("m", "response", &"w".repeat(1 << 20)) + "\n";
    sim.write(1_100, &chunk(long.as_bytes()));
    sim.write(1_400, &chunk(b"{\"model\":\"m\",\"created_at\":\"x\",\"response\":\"\",\"done\":true,\"eval_count\":9}\n"));
    sim.write(1_401, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.token_ns, vec![1_100]);
    assert_eq!((r.output_tokens, r.error), (Some(9), None));
    assert_eq!(sim.r.stats().truncated_events, 1);
}

/// Responses / Anthropic events cut by the capture limit are still read by name.
#[test]
fn cut_responses_and_anthropic_events_use_their_names() {
    let mut sim = Sim::new();
    sim.open(0);
    sim.read(1_000, &post("/v1/responses", r#"{"stream":true}"#));
    sim.write(1_010, SSE_HEAD);
    sim.cap = 90;
    let pad = "p".repeat(200);
    sim.write(
        1_100,
        &sse(
            "response.output_text.delta",
            &format!(r#"{{"type":"response.output_text.delta","delta":"Hi","item_id":"{pad}"}}"#),
        ),
    );
    sim.write(
        1_200,
        &sse(
            "response.output_text.done",
            &format!(r#"{{"type":"response.output_text.done","text":"Hi {pad}"}}"#),
        ),
    );
    sim.write(1_300, &sse("response.completed", &format!(r#"{{"type":"response.completed","response":{{"status":"completed","output":[{{"text":"{pad}"}}],"usage":{{"output_tokens":1}}}}}}"#)));
    sim.write(1_301, b"0\r\n\r\n");
    let r = sim.one();
    assert_eq!(r.stream_kind, StreamKind::OpenaiResponses);
    assert_eq!(
        r.token_ns,
        vec![1_100],
        "the .done event repeats text: not content"
    );
    // The usage lay past the capture: counted instead, and the end marker was still seen.
    assert_eq!(
        (r.output_tokens, r.token_count_source, r.error),
        (Some(1), Some(TokenCountSource::Counted), None)
    );
}

proptest! {
    /// Any split of an Ollama NDJSON stream into writes gives the same events, counts and
    /// finish, and each event's time is the write holding its newline.
    #[test]
    fn ndjson_any_split(cuts in proptest::collection::vec(0usize..400, 0..6)) {
        let mut body = Vec::new();
        let mut ends = Vec::new();
        for w in ["a", "bb", "ccc"] {
            body.extend_from_slice((ollama_line("m", "response", w) + "\n").as_bytes());
            ends.push(body.len() - 1);
        }
        body.extend_from_slice(b"{\"model\":\"m\",\"created_at\":\"x\",\"response\":\"\",\"done\":true,\"eval_count\":3,\"done_reason\":\"stop\"}\n");
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % body.len()).collect();
        cuts.push(0);
        cuts.push(body.len());
        cuts.sort_unstable();
        cuts.dedup();
        let mut sim = Sim::new();
        sim.open(0);
        sim.read(10, &post("/api/generate", r#"{"model":"m","prompt":"x"}"#));
        sim.write(20, NDJSON_HEAD);
        let mut expect = Vec::new();
        for (k, w) in cuts.windows(2).enumerate() {
            let ts = 100 + k as u64;
            sim.write(ts, &chunk(&body[w[0]..w[1]]));
            for &e in &ends {
                if (w[0]..w[1]).contains(&e) {
                    expect.push(ts);
                }
            }
        }
        sim.write(1_000, b"0\r\n\r\n");
        let r = sim.one();
        prop_assert_eq!(&r.token_ns, &expect);
        prop_assert_eq!(r.output_tokens, Some(3));
        prop_assert_eq!(r.error, None);
        prop_assert_eq!(r.finish_reason.as_deref(), Some("stop"));
    }
}
