//! An app behind the gateway that misbehaves on purpose, spoken in raw HTTP/1.1 so it can do
//! what a framework would not: `/hangup?ms=N` reads the request, works N ms and hangs up
//! without answering (the gateway's own 502); `/ok?ms=N` answers 200 after N ms; any request
//! with a body has it read as it comes (chunked or with a length), its bytes counted in
//! [`RawApp::received`], and is answered 200 once it has all of it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub struct RawApp {
    pub addr: SocketAddr,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RawApp {
    pub async fn start() -> RawApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<AtomicU64> = Arc::default();
        let counted = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, counted.clone()));
            }
        });
        RawApp {
            addr,
            received,
            task,
        }
    }

    /// Request body bytes the app has received, in all.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for RawApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn millis(target: &str) -> u64 {
    target
        .split_once('?')
        .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("ms=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn serve(s: TcpStream, received: Arc<AtomicU64>) {
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let target = line.split(' ').nth(1).unwrap_or("/").to_string();
        let (mut length, mut chunked) = (0u64, false);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if h.starts_with("transfer-encoding:") && h.contains("chunked") {
                chunked = true;
            }
        }
        // the body as it comes
        if chunked {
            loop {
                let mut size = String::new();
                if r.read_line(&mut size).await.unwrap_or(0) == 0 {
                    return;
                }
                let n = u64::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                    .unwrap_or(0);
                if n == 0 {
                    let mut end = String::new();
                    let _ = r.read_line(&mut end).await;
                    break;
                }
                let mut chunk = vec![0u8; n as usize + 2];
                let mut got = 0;
                while got < chunk.len() {
                    match r.read(&mut chunk[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            let data = (k).min((n as usize).saturating_sub(got));
                            received.fetch_add(data as u64, Ordering::SeqCst);
                            got += k;
                        }
                    }
                }
            }
        } else {
            let mut left = length;
            let mut buf = [0u8; 8192];
            while left > 0 {
                let want = (left as usize).min(buf.len());
                match r.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => {
                        received.fetch_add(k as u64, Ordering::SeqCst);
                        left -= k as u64;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(millis(&target))).await;
        if target.starts_with("/hangup") {
            return;
        }
        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";
        if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A chunked upload to `proxy` with `key`, as a slow client sends it: `chunks` chunks of `size`
/// bytes, one every `every_ms`, then one of `last` bytes and the end; the gateway's answer
/// (its status line first).
pub async fn trickle_upload(
    proxy: SocketAddr,
    key: &str,
    chunks: usize,
    size: usize,
    every_ms: u64,
    last: usize,
) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nX-License-Key: {key}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..chunks {
        let chunk = format!("{size:x}\r\n{}\r\n", "a".repeat(size));
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
    let _ = s
        .write_all(format!("{last:x}\r\n{}\r\n0\r\n\r\n", "b".repeat(last)).as_bytes())
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}
