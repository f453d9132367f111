//! A local fake kubelet for tests: an HTTPS server (fresh self-signed certificate for
//! 127.0.0.1) answering `GET /pods` with a fixed body when the bearer token matches, 401
//! otherwise. Built for the agent's unit tests and, with the `kubelet-fake` feature, for the
//! end-to-end tests, which replay the recorded response below with their own ids.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A real `kubectl get pods -o json` capture from a minikube node (Docker runtime), as
/// published in github.com/gpdgpa/kuard `temp.sh` (commit 8b6fbf3). The kubelet's `/pods`
/// serves the same `v1.Pod` objects; only the envelope's `kind` differs (`PodList`).
pub const RECORDED: &str = include_str!("testdata/minikube-pods.json");
/// The recorded pod's UID and its one container's runtime id.
pub const RECORDED_UID: &str = "d8aa9a47-ad0f-4bbe-bc12-ab31605d3211";
pub const RECORDED_ID: &str = "d8e1e33309272b4a4267e15f995ff7b6612532240cb61dc03a118659620226f2";

/// A running fake kubelet (it serves until the process exits): its base URL, the PEM of its
/// certificate (the CA to trust) and how many requests it answered.
///
/// A local HTTPS server that answers `GET /pods` with `body` when the bearer token matches
/// (401 otherwise), with a fresh self-signed certificate for `localhost`/127.0.0.1.
pub struct FakeKubelet {
    pub url: String,
    pub ca_pem: String,
    pub requests: Arc<AtomicUsize>,
}

/// Panics when the certificate or listener cannot be set up (test support only).
pub fn fake_kubelet(body: String, token: String) -> FakeKubelet {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let ca_pem = ck.cert.pem();
    let cert_der = ck.cert.der().clone();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()),
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der], key_der)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(tcp) = stream else { continue };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let authorised = head.contains(&format!(
                "authorization: bearer {}\r\n",
                token.to_ascii_lowercase()
            ));
            let (status, payload) = if !head.starts_with("get /pods ") {
                ("404 Not Found", String::new())
            } else if authorised {
                ("200 OK", body.clone())
            } else {
                ("401 Unauthorized", "Unauthorized".to_owned())
            };
            let _ = write!(
tls,
"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
payload.len()
);
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    FakeKubelet {
        url,
        ca_pem,
        requests,
    }
}
