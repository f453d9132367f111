use super::*;
use crate::protocol::shape::StreamKind;

#[test]
fn done_marker() {
    let i = classify(b" [DONE]\n");
    assert!(i.done && i.terminal && !i.content);
}

#[test]
fn vllm_chat_chunks() {
    // vLLM's first chunk carries only the role.
    let role = classify(br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#);
    assert!(!role.content);
    assert_eq!(role.tokens, 0);
    assert_eq!(
        role.model.as_deref(),
        Some("meta-llama/Llama-3.1-8B-Instruct")
    );
    let tok = classify(br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" Hel\"lo\n"},"logprobs":null,"finish_reason":null}]}"#);
    assert!(tok.content && !tok.terminal && !tok.fallback);
    assert_eq!(tok.tokens, 1);
    let fin = classify(br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"length","stop_reason":null}]}"#);
    assert!(fin.terminal && !fin.content);
    assert_eq!(fin.finish_reason.as_deref(), Some("length"));
    let usage = classify(br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":12,"total_tokens":40,"completion_tokens":28}}"#);
    assert_eq!(
        (usage.completion_tokens, usage.prompt_tokens),
        (Some(28), Some(12))
    );
    assert!(!usage.content);
}

#[test]
fn reasoning_tool_calls_and_logprobs() {
    assert!(classify(br#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#).content);
    assert!(classify(br#"{"choices":[{"delta":{"reasoning":"hmm"}}]}"#).content);
    let tc = classify(
        br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]}}]}"#,
    );
    assert!(tc.content);
    assert!(!classify(br#"{"choices":[{"delta":{"tool_calls":[]}}]}"#).content);
    let lp = classify(br#"{"choices":[{"delta":{"content":"ab"},"logprobs":{"content":[{"token":"a","logprob":-0.1},{"token":"b","logprob":-0.2}]}},{"index":1,"delta":{"content":"c"}}]}"#);
    assert_eq!(lp.tokens, 3);
    let comp = classify(br#"{"id":"cmpl","object":"text_completion","choices":[{"index":0,"text":" the","logprobs":{"tokens":[" t","he"],"token_logprobs":[-1,-2]},"finish_reason":null}],"model":"m"}"#);
    assert!(comp.content);
    assert_eq!(comp.tokens, 2);
}

#[test]
fn tgi_native_stream() {
    let t = classify(br#"{"index":1,"token":{"id":1,"text":" world","logprob":-0.5,"special":false},"generated_text":null,"details":null}"#);
    assert!(t.content && !t.terminal);
    let last = classify(br#"{"index":3,"token":{"id":2,"text":"</s>","logprob":-0.1,"special":true},"generated_text":"Hello world","details":{"finish_reason":"eos_token","generated_tokens":3,"seed":null}}"#);
    assert!(!last.content && last.terminal);
    assert_eq!(last.completion_tokens, Some(3));
    assert_eq!(last.finish_reason.as_deref(), Some("eos_token"));
    let err = classify(br#"{"error":"Input validation error: max_new_tokens too large","error_type":"validation"}"#);
    assert_eq!(err.error, Some(None));
}

#[test]
fn llama_cpp_native_completion() {
    let t =
        classify(br#"{"content":" Paris","stop":false,"id_slot":0,"multimodal":false,"index":0}"#);
    assert!(t.content && !t.terminal);
    let last = classify(br#"{"content":"","id_slot":0,"stop":true,"model":"smollm2","tokens_predicted":16,"tokens_evaluated":7,"stop_type":"limit","timings":{"predicted_n":16}}"#);
    assert!(last.terminal && !last.content);
    assert_eq!(
        (last.completion_tokens, last.prompt_tokens),
        (Some(16), Some(7))
    );
    assert_eq!(last.finish_reason.as_deref(), Some("limit"));
}

#[test]
fn error_objects() {
    let e = classify(br#"{"error":{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}}"#);
    assert_eq!(e.error, Some(Some(400)));
    let e =
        classify(br#"{"object":"error","message":"x","type":"InternalServerError","code":500}"#);
    assert_eq!(e.error, Some(Some(500)));
    assert_eq!(
        classify(br#"{"error":{"message":"x","code":"model_not_found"}}"#).error,
        Some(None)
    );
}

#[test]
fn truncated_json_falls_back_to_bytes() {
    let cut = br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content": "The quick brown"#;
    let i = classify(cut);
    assert!(i.fallback && i.content);
    assert_eq!(i.tokens, 1);
    assert_eq!(i.model.as_deref(), Some("m"));
    // A role-only chunk cut short is not content.
    let role = br#"{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":{"content":[{"tok"#;
    assert!(!classify(role).content);
    let tools = br#"{"choices":[{"delta":{"tool_calls": [ {"index":0,"function":{"argu"#;
    assert!(classify(tools).content);
    let fin = br#"{"choices":[{"text":"","finish_reason":"stop"}],"usage":{"completion_tokens":5"#;
    let f = classify(fin);
    assert!(f.terminal && !f.content);
    assert_eq!(
        f.completion_tokens, None,
        "a number at the cut may be incomplete"
    );
}

#[test]
fn non_streaming_bodies() {
    let chat = classify(br#"{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#);
    assert_eq!(
        (chat.completion_tokens, chat.prompt_tokens),
        (Some(2), Some(9))
    );
    assert_eq!(chat.finish_reason.as_deref(), Some("stop"));
    // Not JSON at all.
    let html = classify(b"<html>nope</html>");
    assert!(html.fallback && !html.content && !html.terminal);
}

#[test]
fn request_bodies() {
    let r = request_info(br#"{"model":"llama","messages":[{"role":"user","content":"say \"model\": 1"}],"stream":true}"#);
    assert_eq!(r.model.as_deref(), Some("llama"));
    assert_eq!(r.stream, Some(true));
    // openai-python puts messages first; when the capture cuts the body, fields after the cut
    // are unknown.
    let cut =
        request_info(br#"{"messages":[{"role":"user","content":"a \"model\": \"x\" long prompt"#);
    assert_eq!(cut, RequestInfo::default());
    let cut = request_info(br#"{"model": "Qwen/Qwen2.5-7B", "stream": false, "prompt": "abc"#);
    assert_eq!(cut.model.as_deref(), Some("Qwen/Qwen2.5-7B"));
    assert_eq!(cut.stream, Some(false));
    assert_eq!(request_info(b""), RequestInfo::default());
}

#[test]
fn tgi_non_streaming_array() {
    let i = classify(br#"[{"generated_text":"x","details":{"finish_reason":"length","generated_tokens":20,"seed":null}}]"#);
    assert!(i.fallback);
    assert_eq!(i.completion_tokens, Some(20));
    assert_eq!(i.finish_reason.as_deref(), Some("length"));
}

#[test]
fn responses_events_by_type_or_name() {
    let d = classify_event(
        b"response.output_text.delta",
        br#"{"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi","logprobs":[{"token":"H","logprob":-0.1},{"token":"i","logprob":-0.2}]}"#,
    );
    assert_eq!(d.kind, Some(StreamKind::OpenaiResponses));
    assert!(d.content && !d.terminal && !d.fallback);
    assert_eq!(d.tokens, 2, "per-token logprobs");
    // No `event:` line: `type` suffices; an empty delta is not content.
    let e = classify(br#"{"type":"response.output_text.delta","delta":""}"#);
    assert!(!e.content && e.kind == Some(StreamKind::OpenaiResponses));
    // Reasoning and tool-argument deltas are generated tokens too.
    assert!(classify(br#"{"type":"response.reasoning_text.delta","delta":"hm"}"#).content);
    assert!(
        classify(br#"{"type":"response.function_call_arguments.delta","delta":"{\""}"#).content
    );
    // `.done` events repeat the whole text: not content.
    let done = classify(br#"{"type":"response.output_text.done","text":"Hi there"}"#);
    assert!(!done.content && !done.terminal);
    let c = classify(br#"{"type":"response.completed","response":{"id":"r","object":"response","created_at":1,"status":"completed","model":"gpt-4.1","output":[{"type":"message","content":[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":37,"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}}}"#);
    assert!(c.done && c.terminal && !c.content);
    assert_eq!((c.completion_tokens, c.prompt_tokens), (Some(11), Some(37)));
    assert_eq!(c.finish_reason.as_deref(), Some("completed"));
    assert_eq!(c.model.as_deref(), Some("gpt-4.1"));
    let f = classify(br#"{"type":"response.failed","response":{"status":"failed","error":{"code":"server_error","message":"x"}}}"#);
    assert_eq!(
        (f.done, f.error, f.finish_reason.as_deref()),
        (true, Some(None), Some("failed"))
    );
    let i = classify(br#"{"type":"response.incomplete","response":{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}}"#);
    assert_eq!(i.finish_reason.as_deref(), Some("max_output_tokens"));
    let err = classify_event(
        b"error",
        br#"{"type":"error","code":"ERR","message":"bad"}"#,
    );
    assert_eq!(err.error, Some(None));
    // A non-streaming Responses body.
    let body = classify(br#"{"id":"r","object":"response","status":"completed","output":[],"usage":{"input_tokens":3,"output_tokens":4}}"#);
    assert_eq!(body.kind, Some(StreamKind::OpenaiResponses));
    assert_eq!(
        (body.completion_tokens, body.prompt_tokens),
        (Some(4), Some(3))
    );
}

#[test]
fn anthropic_events() {
    let start = classify_event(b"message_start", br#"{"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-1-20250805", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}"#);
    assert_eq!(start.kind, Some(StreamKind::AnthropicMessages));
    assert!(!start.content);
    assert_eq!(
        (start.prompt_tokens, start.completion_tokens),
        (Some(25), None),
        "message_start's output_tokens is a running count"
    );
    assert_eq!(start.model.as_deref(), Some("claude-opus-4-1-20250805"));
    for (delta, content) in [
        (r#"{"type": "text_delta", "text": "Hello"}"#, true),
        (r#"{"type": "thinking_delta", "thinking": "I need"}"#, true),
        (
            r#"{"type": "input_json_delta", "partial_json": "{\"loc"}"#,
            true,
        ),
        (
            r#"{"type": "signature_delta", "signature": "EqQBCgIYAhIM"}"#,
            false,
        ),
        (r#"{"type": "text_delta", "text": ""}"#, false),
    ] {
        let ev = format!(r#"{{"type": "content_block_delta", "index": 3, "delta": {delta}}}"#);
        let i = classify(ev.as_bytes());
        assert_eq!(i.content, content, "{delta}");
        assert!(i.choices.is_empty(), "content blocks are not choices");
    }
    let md = classify(br#"{"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 15}}"#);
    assert!(md.terminal && !md.done);
    assert_eq!(
        (md.finish_reason.as_deref(), md.completion_tokens),
        (Some("end_turn"), Some(15))
    );
    let stop = classify_event(b"message_stop", br#"{"type": "message_stop"}"#);
    assert!(stop.done && stop.terminal);
    let ping = classify_event(b"ping", br#"{"type": "ping"}"#);
    assert_eq!(ping.kind, Some(StreamKind::AnthropicMessages));
    assert!(!ping.content && !ping.terminal);
    let err = classify_event(
        b"error",
        br#"{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}"#,
    );
    assert_eq!(err.error, Some(None));
    // A non-streaming message body.
    let body = classify(br#"{"id":"m","type":"message","role":"assistant","content":[{"type":"text","text":"Hi"}],"model":"claude","stop_reason":"max_tokens","usage":{"input_tokens":10,"output_tokens":20}}"#);
    assert_eq!(body.kind, Some(StreamKind::AnthropicMessages));
    assert_eq!(
        (
            body.completion_tokens,
            body.prompt_tokens,
            body.finish_reason.as_deref()
        ),
        (Some(20), Some(10), Some("max_tokens"))
    );
}

#[test]
fn ollama_lines() {
    let g = classify(br#"{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","response":"The","done":false}"#);
    assert_eq!(g.kind, Some(StreamKind::Ollama));
    assert!(g.content && !g.terminal);
    let c = classify(br#"{"model":"llama3.2","created_at":"2023-08-04T08:52:19.385406455-07:00","message":{"role":"assistant","content":"The","images":null},"done":false}"#);
    assert!(c.content && c.kind == Some(StreamKind::Ollama));
    let think = classify(br#"{"model":"m","created_at":"x","message":{"role":"assistant","content":"","thinking":"hmm"},"done":false}"#);
    assert!(think.content);
    let tools = classify(br#"{"model":"m","created_at":"x","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{}}}]},"done":false}"#);
    assert!(tools.content);
    let last = classify(br#"{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"","done":true,"done_reason":"stop","context":[1,2,3],"total_duration":10706818083,"load_duration":6338219291,"prompt_eval_count":26,"prompt_eval_duration":130079000,"eval_count":259,"eval_duration":4232710000}"#);
    assert!(last.done && last.terminal && !last.content);
    assert_eq!(
        (
            last.completion_tokens,
            last.prompt_tokens,
            last.finish_reason.as_deref()
        ),
        (Some(259), Some(26), Some("stop"))
    );
    let err = classify(br#"{"error":"model 'x' not found"}"#);
    assert_eq!(err.error, Some(None));
    // Cut final line: the byte-level reading still finds the end and the counts.
    let cut = classify(br#"{"model":"m","created_at":"x","response":"","done":true,"done_reason":"length","prompt_eval_count":26,"eval_count":259,"eval_dur"#);
    assert!(cut.fallback && cut.done);
    assert_eq!(cut.kind, Some(StreamKind::Ollama));
    assert_eq!(
        (
            cut.completion_tokens,
            cut.prompt_tokens,
            cut.finish_reason.as_deref()
        ),
        (Some(259), Some(26), Some("length"))
    );
}

#[test]
fn openai_choices_are_kept_per_index() {
    let i = classify(br#"{"object":"chat.completion.chunk","choices":[{"index":1,"delta":{"content":"a"},"finish_reason":null},{"index":0,"delta":{"content":"b"},"logprobs":{"content":[{"token":"b","logprob":0},{"token":"c","logprob":0}]},"finish_reason":"stop"},{"index":2,"delta":{"role":"assistant"}}]}"#);
    assert_eq!(i.kind, Some(StreamKind::OpenaiChat));
    let per: Vec<(u32, u32, Option<&str>)> = i
        .choices
        .iter()
        .map(|c| (c.index, c.tokens, c.finish_reason.as_deref()))
        .collect();
    assert_eq!(per, vec![(1, 1, None), (0, 2, Some("stop")), (2, 0, None)]);
    assert_eq!(i.tokens, 3);
    let comp = classify(br#"{"choices":[{"text":"x"}]}"#);
    assert_eq!(comp.kind, Some(StreamKind::OpenaiCompletion));
    assert_eq!(comp.choices[0].index, 0, "no index: position");
}

#[test]
fn odd_member_types_do_not_break_the_parse() {
    // `message` as a string (vLLM error objects), `response` as a number, `delta` as an array,
    // `logprobs` as an object: none of them is the shape that uses the name.
    let e = classify(
        br#"{"object":"error","message":"bad request","type":"BadRequestError","code":400}"#,
    );
    assert_eq!(e.error, Some(Some(400)));
    assert!(!e.fallback);
    let odd = classify(br#"{"response":5,"delta":[1],"logprobs":{"a":1},"done":"yes"}"#);
    assert!(!odd.content && odd.kind.is_none());
    // Invalid UTF-8 inside strings: the byte-level reading, no panic.
    let bad = classify_event(
        b"\xff\xfe",
        b"{\"type\":\"content_block_delta\",\"delta\":{\"text\":\"\xff\xfe\"}}",
    );
    assert!(bad.content);
    assert_eq!(bad.kind, Some(StreamKind::AnthropicMessages));
    // Unknown event names with unrecognised data say nothing.
    let u = classify_event(b"custom.thing", br#"{"x":1}"#);
    assert_eq!(u, EventInfo::default());
}
