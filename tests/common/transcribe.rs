//! A transcription-shaped app (`tests/apps/transcribe.py`, Python's standard library only):
//! it reads an uploaded WAV's duration and reports `audio_seconds` and `files` in
//! `Tollgate-Usage`, as an app behind Tollgate would. Stopped (its own process) when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Transcriber {
    pub addr: SocketAddr,
    child: Child,
}

impl Transcriber {
    pub async fn start() -> Transcriber {
        let port = super::free_port();
        let app = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/transcribe.py");
        let child = Command::new("python3")
            .args([app, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the transcription app did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Transcriber { addr, child }
    }

    /// How many uploads to `/transcribe` reached the app.
    pub async fn transcribed(&self) -> i64 {
        let v: serde_json::Value = reqwest::get(format!("http://{}/count", self.addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["transcribe"].as_i64().unwrap()
    }

    /// The request headers of the last POST that reached the app (names in lower case).
    pub async fn last_headers(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/seen", self.addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Transcriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WAV file of `seconds` of silence (8-bit mono at 100 Hz: small, and exact to the second).
pub fn wav(seconds: u32) -> Vec<u8> {
    let rate = 100u32;
    let data = seconds * rate;
    let mut w = Vec::with_capacity(44 + data as usize);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes()); // bytes a second
    w.extend_from_slice(&1u16.to_le_bytes()); // block align
    w.extend_from_slice(&8u16.to_le_bytes()); // bits a sample
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    w.resize(44 + data as usize, 0x80);
    w
}
