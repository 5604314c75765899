//! Backends for the tests: real TCP servers on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend server and how many connections it accepted.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve<F, Fut>(handler: F) -> Backend
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(tcp));
        }
    });
    Backend {
        addr,
        accepted,
        task,
    }
}

/// Echoes every byte back; on EOF it finishes echoing, then closes its write side.
pub async fn echo() -> Backend {
    serve(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Says which backend it is (`name` and a newline), then echoes like [`echo`]: the test sees
/// where the gateway sent each connection.
pub async fn named(name: &'static str) -> Backend {
    serve(move |mut tcp| async move {
        if tcp.write_all(format!("{name}\n").as_bytes()).await.is_err() {
            return;
        }
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Reads until EOF, then answers `reply-to:<n bytes>` followed by `extra` bytes of pattern:
/// an answer that only starts after the client half-closed.
pub async fn answer_after_eof(extra: usize) -> Backend {
    serve(move |mut tcp| async move {
        let mut request = Vec::new();
        if tcp.read_to_end(&mut request).await.is_err() {
            return;
        }
        let mut reply = format!("reply-to:{}\n", request.len()).into_bytes();
        let mut body = vec![0u8; extra];
        super::Pattern::new(7).fill(&mut body);
        reply.extend_from_slice(&body);
        let _ = tcp.write_all(&reply).await;
        let _ = tcp.shutdown().await;
    })
    .await
}

/// Sends `before` bytes, then resets the connection (SO_LINGER 0 and close).
pub async fn reset_after(before: usize) -> Backend {
    serve(move |mut tcp| async move {
        let _ = tcp.write_all(&vec![b'x'; before]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        drop(tcp);
    })
    .await
}

/// Accepts and holds connections open without a byte.
pub async fn silent() -> Backend {
    serve(|tcp| async move {
        let mut tcp = tcp;
        let mut buf = [0u8; 1024];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// An address where nothing listens.
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A listener that never accepts, its queue already full: a connection to it hangs in its
/// handshake (the kernel drops the SYN) until the dialler gives up.
pub struct Unanswered {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
}

pub fn unanswered() -> Unanswered {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the accept queue; connections past it are the ones left hanging.
    let queued = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()
        })
        .collect();
    Unanswered {
        addr,
        _listener: listener,
        _queued: queued,
    }
}

/// A backend that terminates mTLS for `pool` (as buildkitd does in passthrough) and echoes.
pub async fn tls_echo(pki: &control::pki::testing::TestPki, pool: &str) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config(pool, &[b"h2"])));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}
