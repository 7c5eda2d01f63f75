//! HTTPS on both sides with a CA made here: client → tollgate (TLS, HTTP/1.1 and HTTP/2) →
//! upstream (TLS, certificate verified with SNI). A wrong upstream certificate is refused with
//! 502 and nothing is charged.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA, a certificate it signed for localhost and 127.0.0.1, and one nobody trusts.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // distinct names: OpenSSL (curl) takes a leaf named like its issuer for self-signed
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Tollgate test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(names.clone()).unwrap();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = leaf_params.signed_by(&key, &ca, &ca_key).unwrap();
        let rogue_key = KeyPair::generate().unwrap();
        let rogue = CertificateParams::new(names)
            .unwrap()
            .self_signed(&rogue_key)
            .unwrap();
        let w = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        w("ca.pem", ca.pem());
        w("server.pem", leaf.pem());
        w("server.key", key.serialize_pem());
        w("rogue.pem", rogue.pem());
        w("rogue.key", rogue_key.serialize_pem());
        Pki {
            ca_pem: ca.pem(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// An HTTPS app on loopback: answers every request with a fixed body, closing after each.
struct TlsUpstream {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// A TLS acceptor serving `cert` with `key` (PEM files).
fn acceptor(cert: PathBuf, key: PathBuf) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl TlsUpstream {
    async fn start(cert: PathBuf, key: PathBuf) -> TlsUpstream {
        let acceptor = acceptor(cert, key);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, count) = (acceptor.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = "hello via tls";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsUpstream { addr, served, task }
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn settings(pki: &Pki, tls_port: u16) -> Settings {
    Settings {
        proxy_extra: format!(
            "tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             upstream_tls = true\nupstream_sni = \"localhost\"\nupstream_ca = \"{}\"\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            pki.path("ca.pem").display(),
        ),
        ..Settings::default()
    }
}

fn https_client(pki: &Pki, port: u16) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn https_end_to_end_with_a_verified_upstream_and_http2_from_curl() {
    let pki = Pki::new();
    let up = TlsUpstream::start(pki.path("server.pem"), pki.path("server.key")).await;
    let tls_port = free_port();
    let gw = Gateway::start(up.addr, settings(&pki, tls_port)).await;
    let (id, key) = gw.create_key("Ada", "1");

    let c = https_client(&pki, tls_port);
    let r = c
        .get(format!("https://localhost:{tls_port}/secure"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello via tls");
    assert_eq!(up.served.load(Ordering::SeqCst), 1);

    // HTTP/2 from curl, metered per request like any other
    for _ in 0..2 {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
            ])
            .arg("--cacert")
            .arg(pki.path("ca.pem"))
            .args(["--resolve", &format!("localhost:{tls_port}:127.0.0.1")])
            .args(["-H", &format!("X-License-Key: {key}")])
            .arg(format!("https://localhost:{tls_port}/h2"))
            .output()
            .expect("curl runs (scripts/setup.sh installs it)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "2 200",
            "{:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(up.served.load(Ordering::SeqCst), 3);
    gw.wait_for(
        &format!("SELECT coalesce(sum(requests), 0) FROM usage_history WHERE license_id = {id}"),
        3,
    )
    .await;
    // an untrusting client is refused by TLS itself
    let plain = reqwest::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], tls_port)))
        .build()
        .unwrap();
    assert!(plain
        .get(format!("https://localhost:{tls_port}/x"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_with_a_wrong_certificate_is_refused_and_not_charged() {
    let pki = Pki::new();
    let rogue = TlsUpstream::start(pki.path("rogue.pem"), pki.path("rogue.key")).await;
    let tls_port = free_port();
    let gw = Gateway::start(rogue.addr, settings(&pki, tls_port)).await;
    let (id, key) = gw.create_key("Ada", "1");
    let c = https_client(&pki, tls_port);
    for _ in 0..2 {
        let r = c
            .get(format!("https://localhost:{tls_port}/x"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "upstream_unavailable");
    }
    assert_eq!(
        rogue.served.load(Ordering::SeqCst),
        0,
        "a request reached the rogue app"
    );
    gw.wait_for(
        &format!("SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'upstream_error'"),
        2,
    )
    .await;
    assert_eq!(
        gw.count(&format!(
            "SELECT coalesce(sum(requests), 0) FROM usage_history WHERE license_id = {id}"
        )),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_serves_https_with_the_configured_certificate() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let s = Settings {
        admin_extra: format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
        ..Settings::default()
    };
    let gw = Gateway::start(up.addr, s).await;
    let port = gw.admin.port();
    let c = https_client(&pki, port);

    // The operator API over HTTPS, the certificate verified against the test CA.
    let r = c
        .post(format!("https://localhost:{port}/api/licenses"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"name": "Ada", "hours": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let key = v["license_key"].as_str().unwrap().to_string();
    let r = c
        .get(format!("https://localhost:{port}/payments/balance"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["seconds_remaining"], 3_600);

    // A client that does not trust the CA is refused at the handshake.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .unwrap();
    let err = untrusting
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .expect_err("an unknown CA is refused");
    assert!(err.is_connect(), "{err:?}");

    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP was served: {plain:?}"
    );

    // A client that connects and says nothing does not hold up the others.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let r = c
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A quiet WebSocket to an HTTPS app, cut off when its balance runs out: the watch ends the
/// upstream side, which TLS reports as an error rather than an end, and the client still gets
/// its 1008 close frame.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_websocket_to_an_https_app_gets_its_1008_close_frame() {
    let pki = Pki::new();
    let tls = acceptor(pki.path("server.pem"), pki.path("server.key"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(stream) = tls.accept(tcp).await {
                    common::ws::echo(stream).await;
                }
            });
        }
    });
    let mut s = settings(&pki, free_port());
    s.mode = "request_time";
    let gw = Gateway::start(app, s).await;
    let (id, key) = gw.create_key("Ada", "0.00055556"); // 2 s
    common::ws::expect_quiet_websocket_cut_off(&gw, id, &key).await;
    echo.abort();
}

/// A TLS connection to the gateway's HTTPS listener that asks for HTTP/2 by ALPN.
async fn h2_connection(
    pki: &Pki,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// Reads until the server closes; how long that took (`None`: still open after 10 s).
async fn closed_after(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    since: std::time::Instant,
) -> Option<std::time::Duration> {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_trickling_http2_connections_are_closed() {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    let pki = Pki::new();
    let up = TlsUpstream::start(pki.path("server.pem"), pki.path("server.key")).await;
    let tls_port = free_port();
    let mut s = settings(&pki, tls_port);
    s.proxy_extra
        .push_str("downstream_header_timeout_ms = 1000\ndownstream_keepalive_timeout_ms = 1000\n");
    let gw = Gateway::start(up.addr, s).await;
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_millis());

    // a whole preface, then nothing: closed at the idle timeout
    let mut tls = h2_connection(&pki, tls_port).await;
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(EMPTY_SETTINGS).await.unwrap();
    let idle = closed_after(&mut tls, std::time::Instant::now()).await;
    assert!(
        secs(idle).is_some_and(|ms| (900..3_000).contains(&ms)),
        "idle HTTP/2 connection closed after {idle:?}"
    );

    // a preface trickled a byte every 200 ms: cut at the header timeout
    let tls = h2_connection(&pki, tls_port).await;
    let started = std::time::Instant::now();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        for b in PREFACE {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    let mut buf = [0u8; 4096];
    let trickled = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => break None,
        }
    };
    writer.abort();
    assert!(
        secs(trickled).is_some_and(|ms| (900..3_000).contains(&ms)),
        "trickled HTTP/2 preface cut after {trickled:?}"
    );
    let h = client().get(gw.admin_url("/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
}

/// The gateway's HTTPS listener (HTTP/2 by ALPN) in front of a plain app, on a plan with a
/// 1 MiB body cap.
fn capped_https(pki: &Pki, tls_port: u16) -> Settings {
    Settings {
        proxy_extra: format!(
            "tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
        plans: "[[plans]]\nname = \"free\"\nmax_body_bytes = 1048576\n".into(),
        ..Settings::default()
    }
}

/// Issue 16, item 3, over HTTP/2: an upload of unknown length past the plan's cap gets the
/// 413 the gateway sends. Before the fix `curl --http2` reported a framing error.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_upload_past_the_cap_gets_its_413() {
    let pki = Pki::new();
    // an app that reads uploads of any size, behind the gateway's HTTPS listener
    let up = Upstream::start().await;
    let tls_port = free_port();
    let s = capped_https(&pki, tls_port);
    let gw = Gateway::start(up.addr, s).await;
    let (id, key) = gw.create_key("Ada", "1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, vec![7u8; 4 << 20]).unwrap();
    // from stdin: curl does not know the length, so the cap is crossed mid-body
    let out = std::process::Command::new("curl")
        .args(["-s", "--http2", "-X", "POST", "-T", "-", "--max-time", "20"])
        .args(["-w", "\n%{http_version} %{http_code}"])
        .arg("--cacert")
        .arg(pki.path("ca.pem"))
        .args(["--resolve", &format!("localhost:{tls_port}:127.0.0.1")])
        .args(["-H", &format!("X-License-Key: {key}")])
        .arg(format!("https://localhost:{tls_port}/upload"))
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.ends_with("2 413"),
        "{:?} {text} {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    assert!(text.contains("payload_too_large"), "{text}");
    gw.wait_for(
        &format!("SELECT count(*) FROM access_logs WHERE license_id = {id} AND status = 413"),
        1,
    )
    .await;
}

/// HTTP/2 on both sides (`proxy.upstream_h2`, an h2c app that streams and reports in a
/// trailer): trailers cross the gateway here, so this is where the app's usage trailer must be
/// taken off. The client gets the stream and `X-Usage-Charged` as a trailer, never the app's
/// `Tollgate-Usage`; the balance falls by what the trailer said.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_gets_what_it_was_charged_as_a_trailer_and_never_the_apps_report() {
    let pki = Pki::new();
    let app = common::llm::H2App::start().await;
    let tls_port = free_port();
    let mut s = capped_https(&pki, tls_port);
    s.proxy_extra.push_str("upstream_h2 = true\n");
    s.extra = "[[meters]]\nname = \"tokens\"\nprice_ms = 10\nmax_per_request = 100000\n\n\
               [[routes]]\npath = \"/stream\"\ncharge = \"reported\"\nmeters = [\"tokens\"]\n\
               reserve = { tokens = 100 }\nreport_from = \"trailer\"\n"
        .into();
    let gw = Gateway::start(app.addr, s).await;
    let (id, key) = gw.create_key("Ada", "1");
    let tls = h2_connection(&pki, tls_port).await;
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("https://localhost:{tls_port}/stream?tokens=42"))
        .header("x-license-key", &key)
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("tollgate-usage").is_none());
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    assert_eq!(text, b"chunk0chunk1chunk2");
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert!(trailers.get("tollgate-usage").is_none(), "{trailers:?}");
    assert_eq!(trailers["x-usage-charged"], "tokens=42, balance_ms=420");
    gw.wait_for(
        &format!("SELECT balance_ms FROM licenses WHERE id = {id}"),
        3_600_000 - 420,
    )
    .await;
}

/// The same with an HTTP/2 client library (h2, what hyper uses): the refusal arrives while the
/// upload is still being sent, and the client gets it instead of waiting for a timeout.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_library_sees_the_413_of_an_upload_past_the_cap() {
    let pki = Pki::new();
    let up = Upstream::start().await;
    let tls_port = free_port();
    let s = capped_https(&pki, tls_port);
    let gw = Gateway::start(up.addr, s).await;
    let (_, key) = gw.create_key("Ada", "1");
    let tls = h2_connection(&pki, tls_port).await;
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("https://localhost:{tls_port}/upload"))
        .header("x-license-key", &key)
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let started = std::time::Instant::now();
    // 4 MiB, as flow control allows; the answer may come at any point
    let sending = tokio::spawn(async move {
        let mut left = 4usize << 20;
        while left > 0 {
            body.reserve_capacity(left.min(16 * 1024));
            let n = match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                Some(Ok(n)) => n.min(left),
                _ => return left,
            };
            left -= n;
            let piece = axum::body::Bytes::from(vec![7u8; n]);
            if body.send_data(piece, left == 0).is_err() {
                return left;
            }
        }
        0
    });
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), response)
        .await
        .expect("an answer within 10 s")
        .expect("a response, not a stream error");
    assert_eq!(response.status(), 413);
    let mut answer = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = answer.data().await {
        let chunk = chunk.unwrap();
        let _ = answer.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&text).contains("payload_too_large"));
    assert!(started.elapsed() < std::time::Duration::from_secs(6));
    let _ = sending.await;
}

/// An HTTP/2 connection over TLS from `from`, its streams opened to `path`, each sending one
/// byte of a body that says it is a megabyte and never ends (each may hold an upstream socket
/// while the app waits for the rest). Stops at `n` streams, or when the server takes no more.
async fn slow_h2_streams(
    pki: &Pki,
    from: [u8; 4],
    port: u16,
    path: &str,
    n: usize,
) -> (
    Vec<h2::SendStream<axum::body::Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut streams = Vec::new();
    for _ in 0..n {
        let Ok(Ok(ready)) =
            tokio::time::timeout(std::time::Duration::from_secs(1), send.clone().ready()).await
        else {
            break; // the server allows no more streams on this connection
        };
        send = ready;
        let req = http::Request::post(format!("https://localhost{path}"))
            .header("content-length", "1000000")
            .body(())
            .unwrap();
        let Ok((_, mut body)) = send.send_request(req, false) else {
            break;
        };
        let _ = body.send_data(axum::body::Bytes::from_static(b"x"), false);
        streams.push(body);
    }
    (streams, driver)
}

/// A GET of `path` with `key` over a new HTTP/2 connection (TLS, ALPN); the answer's status.
async fn h2_get(pki: &Pki, port: u16, path: &str, key: &str) -> u16 {
    let tls = h2_connection(pki, port).await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let req = http::Request::get(format!("https://localhost{path}"))
        .header("x-license-key", key)
        .body(())
        .unwrap();
    let (answer, _) = send.send_request(req, true).unwrap();
    let status = answer.await.unwrap().status().as_u16();
    driver.abort();
    status
}

/// Issue 30, item 2. Under a descriptor limit of 256, three attacks at once from three
/// addresses: 300 connections to the HTTPS listener that never start their handshake, 300
/// silent ones to the plain listener, and three HTTP/2 connections opening 100 streams each to
/// a free path, every stream a slow upload holding an upstream socket. A real client from
/// 127.0.0.1 keeps being served over HTTPS (HTTP/2 and 1.1) and plain HTTP, and the admin
/// answers. Before: connections counted against no cap until their handshake ended (Pingora
/// holds a silent one 60 s), each HTTP/2 stream held its own upstream socket, and the process
/// ran out of descriptors ("Too many open files"): proxy and admin answered nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_with_256_descriptors_serves_through_idle_handshakes_slow_streams_and_idle_tcp() {
    gateway::fds::raise_limit(); // this test process holds the attack's sockets too
    let pki = Pki::new();
    let up = Upstream::start().await;
    let tls_port = free_port();
    let gw = Gateway::start(
        up.addr,
        Settings {
            nofile: Some(256),
            free_paths: vec!["/public/*".into()],
            proxy_extra: format!(
                "tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
                 tls_handshake_timeout_ms = 3000\n",
                pki.path("server.pem").display(),
                pki.path("server.key").display(),
            ),
            ..Settings::default()
        },
    )
    .await;
    let (_, key) = gw.create_key("Ada", "1");
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));

    let mut idle_handshakes = common::flood::hold([127, 0, 0, 2], tls_addr, 300).await;
    let idle_tcp = common::flood::hold([127, 0, 0, 3], gw.proxy, 300).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(slow_h2_streams(&pki, [127, 0, 0, 4], tls_port, "/public/upload", 100).await);
    }
    let opened: usize = streams.iter().map(|(s, _)| s.len()).sum();
    assert!(
        idle_handshakes.len() + idle_tcp.len() >= 500 && opened >= 100,
        "the attack is under way: {} + {} idle, {opened} streams",
        idle_handshakes.len(),
        idle_tcp.len()
    );
    // the app is holding the attacker's uploads
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let https = https_client(&pki, tls_port);
    let plain = client();
    for i in 0..10 {
        let h2 = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            h2_get(&pki, tls_port, "/app", &key),
        )
        .await
        .unwrap_or_else(|_| panic!("HTTP/2 request {i} timed out"));
        assert_eq!(h2, 200, "HTTP/2 request {i}");
        for (what, c, url) in [
            ("HTTPS", &https, format!("https://localhost:{tls_port}/app")),
            ("HTTP", &plain, gw.url("/app")),
        ] {
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                c.get(url).header("X-License-Key", &key).send(),
            )
            .await
            .unwrap_or_else(|_| panic!("{what} request {i} timed out"))
            .unwrap_or_else(|e| panic!("{what} request {i}: {e}"));
            assert_eq!(r.status(), 200, "{what} request {i}");
        }
        let health = client().get(gw.admin_url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
    // handshakes never started are cut at their timeout (3 s), places at once
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while common::flood::closed_count(&mut idle_handshakes).await < idle_handshakes.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "silent TLS connections still open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let log = gw.log();
    assert!(
        !log.contains("Too many open files") && !log.contains("os error 24"),
        "{log}"
    );
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains("tollgate_denied_total{reason=\"concurrency_limit\"}"),
        "the attacker's streams past its share were refused"
    );
    drop(streams);
}
