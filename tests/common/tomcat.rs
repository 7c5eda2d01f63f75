//! A real servlet container as the app: Tomcat 10.1 embedded (Debian's
//! `libtomcat10-embed-java`, which scripts/setup.sh installs), running `tests/tomcat/App.java`,
//! compiled here with the JDK's `javac`: a free servlet at `/public/*` and a paid one at
//! `/private/*`, each answering its own name and the path it got. Stopped (its own process)
//! when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JARS: [&str; 2] = [
    "/usr/share/java/tomcat10-embed-core.jar",
    "/usr/share/java/jakarta-annotation-api.jar",
];

pub struct Tomcat {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Tomcat {
    pub async fn start() -> Tomcat {
        let dir = tempfile::tempdir().unwrap();
        let classes = dir.path().join("classes");
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tomcat/App.java");
        let classpath = JARS.join(":");
        let out = Command::new("javac")
            .args(["-nowarn", "-d"])
            .arg(&classes)
            .args(["-cp", &classpath, source])
            .output()
            .expect("javac runs (./scripts/setup.sh installs a JDK and Tomcat)");
        assert!(
            out.status.success(),
            "javac: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = super::free_port();
        let child = Command::new("java")
            .arg("-cp")
            .arg(format!("{}:{classpath}", classes.display()))
            .args(["App", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("java runs");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "Tomcat did not listen on {addr}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Tomcat {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Tomcat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
