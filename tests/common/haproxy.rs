//! HAProxy (Debian's package; scripts/setup.sh installs it) round-robin in front of several
//! gateway nodes, on loopback: one frontend for their proxy ports, one for their admin ports.
//! A node whose port stops answering is taken out by HAProxy's health check (every 200 ms) and
//! a request it could not connect for is sent to another. Stopped, by its own pid, when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Haproxy {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy"
    } else {
        "haproxy"
    }
}

impl Haproxy {
    /// In front of these nodes: (proxy address, admin address) each.
    pub async fn start(nodes: &[(SocketAddr, SocketAddr)]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let servers = |pick: fn(&(SocketAddr, SocketAddr)) -> SocketAddr, name: &str| {
            nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    format!(
                        "    server {name}{i} {} check inter 200 fall 1 rise 1\n",
                        pick(n)
                    )
                })
                .collect::<String>()
        };
        let config = format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    \
             timeout server 30s\n    retries 3\n    option redispatch 1\n\
             frontend proxy\n    bind {proxy}\n    default_backend nodes\n\
             backend nodes\n    balance roundrobin\n{}\
             frontend admin\n    bind {admin}\n    default_backend admins\n\
             backend admins\n    balance roundrobin\n{}",
            servers(|n| n.0, "node"),
            servers(|n| n.1, "admin"),
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary())
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
            .spawn()
            .expect("haproxy runs (scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(proxy).await.is_err()
            || tokio::net::TcpStream::connect(admin).await.is_err()
        {
            assert!(Instant::now() < deadline, "haproxy did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Haproxy {
            child,
            proxy,
            admin,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
