//! A loopback relay between a gateway and its PostgreSQL server that can misbehave as networks
//! and poolers do: hold every byte both ways (a network that drops packets: nothing arrives,
//! nothing fails, until it heals), lose the answer to one flush's `COMMIT` after passing the
//! `COMMIT` on (a reset or failover between the commit record and the reply), or drop the
//! server's change notices (a pooler that does not carry `LISTEN`). It reads the protocol's
//! messages (a type byte and a length) to know what it passes; TLS is not spoken through it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Controls {
    /// Nothing passes either way while set (what was read is held, and passed on after).
    hold: AtomicBool,
    /// The next `COMMIT` of a transaction that ran a statement holding this text is passed on
    /// and its answer lost: the connection is cut once the server has had time to commit.
    lose_commit_of: std::sync::Mutex<Option<&'static [u8]>>,
    /// Commits whose answer was lost.
    lost: AtomicU64,
    /// The server's notices (`NotificationResponse`) are dropped.
    drop_notices: AtomicBool,
}

pub struct Relay {
    pub addr: SocketAddr,
    controls: Arc<Controls>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay to the server at `to`, on a loopback port of its own.
    pub async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let controls: Arc<Controls> = Arc::default();
        let c = controls.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, c.clone()));
            }
        });
        Relay {
            addr,
            controls,
            task,
        }
    }

    /// `url` (a `postgres://` URL) with its host and port replaced by the relay's.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme_user, rest) = url.split_once('@').expect("a URL with a user");
        let (_host, path) = rest.split_once('/').expect("a URL with a database");
        format!("{scheme_user}@{}/{path}", self.addr)
    }

    /// Holds every byte both ways (`true`), or lets them pass again.
    pub fn hold(&self, on: bool) {
        self.controls.hold.store(on, Ordering::SeqCst);
    }

    /// Loses the answer to the next flush's `COMMIT`, after passing the `COMMIT` on.
    pub fn lose_next_flush_commit(&self) {
        self.lose_next_commit_of("INSERT INTO flushes");
    }

    /// Loses the answer to the next `COMMIT` of a transaction that ran a statement holding
    /// `text` (`"INSERT INTO leases"`: a lease grant), after passing the `COMMIT` on.
    pub fn lose_next_commit_of(&self, text: &'static str) {
        *self.controls.lose_commit_of.lock().unwrap() = Some(text.as_bytes());
    }

    /// How many commits' answers were lost.
    pub fn lost_commits(&self) -> u64 {
        self.controls.lost.load(Ordering::SeqCst)
    }

    /// Drops the server's change notices (`true`), or passes them again.
    pub fn drop_notices(&self, on: bool) {
        self.controls.drop_notices.store(on, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection's shared state.
#[derive(Default)]
struct Conn {
    /// The answer to this connection's commit is being lost: nothing more goes to the client.
    cut: AtomicBool,
}

/// What the client side of one connection has said: the statements it prepared, and those the
/// transaction under way ran.
#[derive(Default)]
struct Said {
    statements: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    in_transaction: Vec<Vec<u8>>,
}

impl Said {
    /// Takes note of one message (its type and body).
    fn note(&mut self, kind: u8, body: &[u8]) {
        let mut fields = body.split(|b| *b == 0);
        match kind {
            // Parse: statement name, query
            b'P' => {
                let (name, query) = (fields.next().unwrap_or(&[]), fields.next().unwrap_or(&[]));
                self.statements.insert(name.to_vec(), query.to_vec());
            }
            // Bind: portal, statement name
            b'B' => {
                let _portal = fields.next();
                if let Some(q) = self.statements.get(fields.next().unwrap_or(&[])) {
                    self.in_transaction.push(q.clone());
                }
            }
            _ => {}
        }
    }

    /// Whether the transaction under way ran a statement holding `text`.
    fn ran(&self, text: &[u8]) -> bool {
        self.in_transaction.iter().any(|q| find(q, text))
    }
}

async fn relay(client: TcpStream, server: TcpStream, c: Arc<Controls>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let conn = Arc::new(Conn::default());
    let up = tokio::spawn(client_to_server(cr, sw, c.clone(), conn.clone()));
    let down = tokio::spawn(server_to_client(sr, cw, c, conn));
    let _ = tokio::join!(up, down);
}

/// Reads exactly `n` bytes, or none at the end of the stream.
async fn read_n(r: &mut OwnedReadHalf, n: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

async fn wait_while_held(c: &Controls) {
    while c.hold.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The client's side: a startup packet (an SSL request first, perhaps), then typed messages.
async fn client_to_server(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    c: Arc<Controls>,
    conn: Arc<Conn>,
) {
    // untyped packets first: an SSL request (length 8) is followed by the startup packet
    loop {
        let Some(len) = read_n(&mut r, 4).await else {
            return;
        };
        let n = u32::from_be_bytes(len[..4].try_into().unwrap()) as usize;
        let Some(body) = read_n(&mut r, n - 4).await else {
            return;
        };
        wait_while_held(&c).await;
        if w.write_all(&len).await.is_err() || w.write_all(&body).await.is_err() {
            return;
        }
        let ssl_request = n == 8 && body[..4] == [0x04, 0xd2, 0x16, 0x2f];
        if !ssl_request {
            break;
        }
    }
    let mut said = Said::default();
    loop {
        let Some(head) = read_n(&mut r, 5).await else {
            return;
        };
        let n = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let Some(body) = read_n(&mut r, n - 4).await else {
            return;
        };
        wait_while_held(&c).await;
        said.note(head[0], &body);
        let commit = head[0] == b'Q' && body.starts_with(b"COMMIT\0");
        let lose = commit && {
            let mut armed = c.lose_commit_of.lock().unwrap();
            let hit = armed.is_some_and(|text| said.ran(text));
            if hit {
                *armed = None;
            }
            hit
        };
        if head[0] == b'Q' && (commit || body.starts_with(b"ROLLBACK\0")) {
            said.in_transaction.clear();
        }
        if lose {
            // nothing more reaches the client from here on
            conn.cut.store(true, Ordering::SeqCst);
            c.lost.fetch_add(1, Ordering::SeqCst);
        }
        if w.write_all(&head).await.is_err() || w.write_all(&body).await.is_err() {
            return;
        }
        if lose {
            // the server commits; then the connection is gone without its answer
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = w.shutdown().await;
            return;
        }
    }
}

/// The server's side: perhaps a one-byte answer to an SSL request, then typed messages.
async fn server_to_client(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    c: Arc<Controls>,
    conn: Arc<Conn>,
) {
    // the answer to an SSL request is one byte, 'N' (no TLS here); a typed message's first
    // byte is never 'N'
    let mut first = [0u8; 1];
    if r.read_exact(&mut first).await.is_err() {
        return;
    }
    let mut pending: Option<u8> = Some(first[0]);
    if first[0] == b'N' {
        wait_while_held(&c).await;
        if w.write_all(&first).await.is_err() {
            return;
        }
        pending = None;
    }
    loop {
        let mut head = [0u8; 5];
        let start = match pending.take() {
            Some(b) => {
                head[0] = b;
                1
            }
            None => 0,
        };
        if r.read_exact(&mut head[start..]).await.is_err() {
            return;
        }
        let n = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let Some(body) = read_n(&mut r, n - 4).await else {
            return;
        };
        wait_while_held(&c).await;
        if conn.cut.load(Ordering::SeqCst) {
            let _ = w.shutdown().await;
            return;
        }
        if head[0] == b'A' && c.drop_notices.load(Ordering::SeqCst) {
            continue;
        }
        if w.write_all(&head).await.is_err() || w.write_all(&body).await.is_err() {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
