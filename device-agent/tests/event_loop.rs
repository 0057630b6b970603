//! The agent's event loop against a scripted fake hub (plain ws on loopback, JSON): a hub
//! that goes silent is detected and left with close 4003, a command delivered twice runs
//! once, and a hub that sends garbage is left with 1007. The real hub is exercised by the
//! end-to-end tests in `tests/tests/agent_e2e.rs`.

use std::path::Path;
use std::time::Duration;

use device_agent::config::{self, Sources};
use futures_util::{SinkExt, StreamExt};
use schemas::codec::{decode_json, encode_json};
use schemas::message::truncated;
use schemas::{Command, DeviceMessage, HubMessage, Welcome};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const T: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

/// Accepts one device connection, checking the token and agreeing to JSON.
// The callback's error type is tungstenite's (an HTTP response), not ours to shrink.
#[allow(clippy::result_large_err)]
async fn accept(listener: &TcpListener) -> Ws {
    let (tcp, _) = tokio::time::timeout(T, listener.accept())
        .await
        .expect("the agent to connect")
        .expect("accept");
    tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, mut resp: Response| {
        assert_eq!(
            req.headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer test-token")
        );
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("hub.v1.json"),
        );
        Ok(resp)
    })
    .await
    .expect("upgrade")
}

/// The next protocol message from the agent, or its close code.
async fn next(ws: &mut Ws) -> Result<DeviceMessage, u16> {
    loop {
        let frame = tokio::time::timeout(T, ws.next())
            .await
            .expect("a frame from the agent");
        match frame {
            Some(Ok(Message::Text(t))) => return Ok(decode_json(t.as_str()).expect("json")),
            Some(Ok(Message::Close(f))) => return Err(f.map_or(1005, |f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(1006),
        }
    }
}

async fn send(ws: &mut Ws, msg: &HubMessage) {
    ws.send(Message::text(encode_json(msg)))
        .await
        .expect("send");
}

/// Reads `hello`, answers `welcome` with fast liveness timers.
async fn welcome(ws: &mut Ws) {
    match next(ws).await {
        Ok(DeviceMessage::Hello(h)) => assert!(h.firmware.starts_with("device-agent/")),
        other => panic!("expected hello, got {other:?}"),
    }
    send(
        ws,
        &HubMessage::Welcome(Welcome {
            server_time: device_agent::epoch_ms(),
            ping_interval_ms: 200,
            pong_timeout_ms: 100,
            last_seq: 0,
            max_readings: 64,
            max_message_bytes: 16384,
        }),
    )
    .await;
}

fn agent_config(dir: &Path, port: u16) -> device_agent::config::AgentConfig {
    let script = dir.join("count.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nn=$(cat \"$1\" 2>/dev/null || echo 0)\necho $((n+1)) > \"$1\"\necho ran\n",
    )
    .expect("script");
    let text = format!(
        r#"data_dir = "{data}"
sensors = []
[hub]
url = "ws://127.0.0.1:{port}/v1/device"
device_id = "loop-1"
token = "test-token"
encoding = "json"
[reconnect]
initial = "50ms"
max = "200ms"
[[actions]]
name = "count"
program = "/bin/sh"
args = ["{script}", "{runs}"]
"#,
        data = dir.join("data").display(),
        script = script.display(),
        runs = dir.join("runs").display(),
    );
    let file = dir.join("agent.toml");
    std::fs::write(&file, text).expect("config");
    config::load(&Sources {
        file: Some(file),
        env: Vec::new(),
    })
    .expect("valid config")
    .config
}

/// Runs the agent until the returned sender is dropped or fired.
fn start_agent(
    dir: &Path,
    port: u16,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config = agent_config(dir, port);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        device_agent::agent::run(config, async {
            let _ = stopped.await;
        })
        .await
        .expect("agent");
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_hub_is_left_with_4003_and_reconnected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, task) = start_agent(dir.path(), port);
    let mut ws = accept(&listener).await;
    welcome(&mut ws).await;
    // No pings, nothing: after ping interval + pong timeout + 1 s grace the agent gives up.
    let started = std::time::Instant::now();
    let code = loop {
        match next(&mut ws).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, schemas::close::LIVENESS_TIMEOUT);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1200), "{waited:?}");
    // And it comes back.
    let mut again = accept(&listener).await;
    welcome(&mut again).await;
    let _ = stop.send(());
    task.await.expect("agent task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_runs_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, task) = start_agent(dir.path(), port);
    let mut ws = accept(&listener).await;
    welcome(&mut ws).await;
    let cmd = HubMessage::Command(Command {
        id: 7,
        name: truncated("count"),
        args: truncated("{}"),
        deadline: device_agent::epoch_ms() + 60_000,
    });
    send(&mut ws, &cmd).await;
    let mut acks = 0;
    let mut results = Vec::new();
    while results.is_empty() {
        match next(&mut ws).await {
            Ok(DeviceMessage::CommandAck(a)) if a.id == 7 => acks += 1,
            Ok(DeviceMessage::CommandResult(r)) => results.push(r),
            Ok(_) => {}
            Err(code) => panic!("closed with {code}"),
        }
    }
    assert!(results[0].ok, "{:?}", results[0]);
    assert_eq!(results[0].output.as_str(), "ran\n");
    // Delivered again (at-least-once): acknowledged and answered, not run again.
    send(&mut ws, &cmd).await;
    while results.len() < 2 {
        match next(&mut ws).await {
            Ok(DeviceMessage::CommandAck(a)) if a.id == 7 => acks += 1,
            Ok(DeviceMessage::CommandResult(r)) => results.push(r),
            Ok(_) => {}
            Err(code) => panic!("closed with {code}"),
        }
    }
    assert_eq!(acks, 2);
    assert!(
        results[1].output.contains("duplicate delivery"),
        "{:?}",
        results[1]
    );
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    assert_eq!(runs.trim(), "1");
    // An unknown command and a deadline in the past fail without running anything.
    for (id, name, deadline) in [
        (8, "reboot", device_agent::epoch_ms() + 60_000),
        (9, "count", 1),
    ] {
        send(
            &mut ws,
            &HubMessage::Command(Command {
                id,
                name: truncated(name),
                args: truncated("{}"),
                deadline,
            }),
        )
        .await;
        let result = loop {
            match next(&mut ws).await {
                Ok(DeviceMessage::CommandResult(r)) if r.id == id => break r,
                Ok(_) => {}
                Err(code) => panic!("closed with {code}"),
            }
        };
        assert!(!result.ok);
        assert_eq!(result.code, device_agent::actions::REFUSED);
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("runs"))
            .expect("runs")
            .trim(),
        "1"
    );
    let _ = stop.send(());
    task.await.expect("agent task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_hub_is_left_with_1007() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, task) = start_agent(dir.path(), port);
    let mut ws = accept(&listener).await;
    welcome(&mut ws).await;
    ws.send(Message::text("{not json")).await.expect("send");
    let code = loop {
        match next(&mut ws).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, schemas::close::INVALID_PAYLOAD);
    // A binary frame on a JSON connection: 1003.
    let mut again = accept(&listener).await;
    welcome(&mut again).await;
    again
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .expect("send");
    let code = loop {
        match next(&mut again).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, schemas::close::UNSUPPORTED_DATA);
    let _ = stop.send(());
    task.await.expect("agent task");
}
