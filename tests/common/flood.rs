//! An attacker's idle connections: opened from a loopback address of its own (Linux answers
//! for all of 127.0.0.0/8), so the caps per client address tell it from the real client on
//! 127.0.0.1.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The attacker's usual address.
pub const ATTACKER: [u8; 4] = [127, 0, 0, 2];

/// Opens up to `n` connections to `addr` from `from` and keeps them, silent.
pub async fn hold(from: impl Into<IpAddr>, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let from = SocketAddr::new(from.into(), 0);
    let mut held = Vec::new();
    for _ in 0..n {
        // out of descriptors here: the attack is as large as this process can make it
        let Ok(s) = tokio::net::TcpSocket::new_v4() else {
            break;
        };
        s.bind(from).unwrap();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(1), s.connect(addr)).await {
            held.push(c);
        }
    }
    held
}

/// How many of these connections the server has closed.
pub async fn closed_count(held: &mut [TcpStream]) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 64];
    for s in held.iter_mut() {
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => n += 1,
            _ => {}
        }
    }
    n
}
