use super::*;

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
