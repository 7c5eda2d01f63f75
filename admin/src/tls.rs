//! HTTPS for the admin listener: the rustls server config (the handshakes run in
//! [`crate::serve`], each in its connection's task with a deadline).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;

/// Reads a PEM certificate chain and key into a server config (HTTP/1.1 by ALPN).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    gateway::tls::server_config(cert, key, &[b"http/1.1"])
}
