//! Apps that report their usage at the end of their answer: one that speaks HTTP/2 without TLS
//! (h2c, as `proxy.upstream_h2` talks to it) and streams, then reports in a trailer; one in the
//! OpenAI style (HTTP/1.1) whose answer, a JSON body or an SSE stream, ends with a `usage`
//! object.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Response};

/// The headers of each request an app got, in order.
type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// The headers of the last request in `seen`.
fn last(seen: &Seen) -> HeaderMap {
    seen.lock().unwrap().last().cloned().unwrap_or_default()
}

fn query(uri: &axum::http::Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| serde_urlencoded::from_str(q).unwrap())
        .unwrap_or_default()
}

/// An h2c app. `GET /stream?tokens=N` sends three chunks, 50 ms apart, then the trailer
/// `Tollgate-Usage: tokens=N` (`&trailer=none`: no trailer; `&head=N`: the report on the head
/// instead); `/reset` sends its head and a chunk, then resets the stream.
pub struct H2App {
    pub addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl H2App {
    pub async fn start() -> H2App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let got = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let got = got.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        got.lock().unwrap().push(req.headers().clone());
                        tokio::spawn(h2_answer(req, respond));
                    }
                });
            }
        });
        H2App { addr, seen, task }
    }

    /// The headers of the last request the app got.
    pub fn last_headers(&self) -> HeaderMap {
        last(&self.seen)
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for H2App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn h2_answer(
    req: axum::http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let q = query(req.uri());
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let mut head = Response::builder().status(200);
    if let Some(n) = q.get("head") {
        head = head.header("tollgate-usage", format!("tokens={n}"));
    }
    let Ok(mut stream) = respond.send_response(head.body(()).unwrap(), false) else {
        return;
    };
    if path == "/reset" {
        let _ = stream.send_data(Bytes::from_static(b"chunk0"), false);
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    }
    for i in 0..3 {
        let _ = stream.send_data(Bytes::from(format!("chunk{i}")), false);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match q.get("tokens") {
        Some(n) if q.get("trailer").map(String::as_str) != Some("none") => {
            let mut trailers = HeaderMap::new();
            trailers.insert("tollgate-usage", format!("tokens={n}").parse().unwrap());
            let _ = stream.send_trailers(trailers);
        }
        _ => {
            let _ = stream.send_data(Bytes::new(), true);
        }
    }
}

/// An OpenAI-style app (HTTP/1.1). `POST /v1/chat/completions?prompt=P&completion=C` answers
/// JSON ending in `"usage": {"prompt_tokens": P, "completion_tokens": C, "total_tokens":
/// P+C}`; `&stream=1`: an SSE stream of `events` chunks (each `pad` bytes of text, 20 ms
/// apart), each with `"usage": null`, then the usage chunk and `[DONE]`; `&usage=none`: no
/// usage object at all.
pub struct ChatApp {
    pub addr: SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl ChatApp {
    pub async fn start() -> ChatApp {
        let seen = Seen::default();
        let got = seen.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, _body: Bytes| {
                let got = got.clone();
                async move {
                    got.lock().unwrap().push(headers);
                    chat_answer(query(&uri))
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ChatApp { addr, seen, task }
    }

    pub fn last_headers(&self) -> HeaderMap {
        last(&self.seen)
    }
}

impl Drop for ChatApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn chat_answer(q: HashMap<String, String>) -> Response<axum::body::Body> {
    let n = |k: &str, d: u64| q.get(k).map_or(d, |v| v.parse().unwrap());
    let (prompt, completion) = (n("prompt", 9), n("completion", 12));
    let usage = match q.get("usage").map(String::as_str) {
        Some("none") => "null".to_string(),
        _ => format!(
            r#"{{"prompt_tokens": {prompt}, "completion_tokens": {completion}, "total_tokens": {}}}"#,
            prompt + completion
        ),
    };
    if q.contains_key("stream") {
        let (events, pad) = (n("events", 3), n("pad", 10) as usize);
        let stream = async_stream(events, pad, usage);
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(stream))
            .unwrap();
    }
    let text = "x".repeat(n("pad", 10) as usize);
    Response::builder()
        .header("content-type", "application/json")
        .body(axum::body::Body::from(format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}}}}],"usage":{usage}}}"#
        )))
        .unwrap()
}

fn async_stream(
    events: u64,
    pad: usize,
    usage: String,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let text = "y".repeat(pad);
    futures_util::stream::unfold(0u64, move |i| {
        let (text, usage) = (text.clone(), usage.clone());
        async move {
            let chunk = match i {
                i if i < events => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    format!(
                        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n"
                    )
                }
                i if i == events => format!("data: {{\"choices\":[],\"usage\":{usage}}}\n\n"),
                i if i == events + 1 => "data: [DONE]\n\n".to_string(),
                _ => return None,
            };
            Some((Ok(Bytes::from(chunk)), i + 1))
        }
    })
}
